"""OpenAI request bodies: every field checked, unknown and unsupported ones refused by name; stop strings."""

from __future__ import annotations

import json

import pytest

from oppu.serving.openai_api import ApiError, ChatBody, CompletionBody, error_body, parse_body
from oppu.serving.textstream import ChoiceText


def parse(body: dict, model=CompletionBody):
    return parse_body(json.dumps(body).encode(), model)


def test_a_full_completions_body_maps_onto_sampling_parameters():
    body = parse({"model": "base:u1", "prompt": ["hi"], "max_tokens": 5, "temperature": 0.7, "top_p": 0.9,
                  "top_k": 20, "n": 2, "stream": True, "stream_options": {"include_usage": True},
                  "logprobs": 2, "stop": ["\n", "END"], "presence_penalty": 0.5, "frequency_penalty": -0.5,
                  "seed": 42, "user": "end-user-7", "echo": False, "logit_bias": {}, "best_of": 1})
    body.check(max_n=4)
    params = body.sampling(default_temperature=1.0, logprobs=body.logprobs)
    assert (params.temperature, params.top_p, params.top_k, params.seed, params.logprobs) == (0.7, 0.9, 20, 42, 2)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert body.stops() == ("\n", "END") and body.include_usage and body.prompt_text() == "hi"
    assert parse({"model": "m", "prompt": "x"}).sampling(1.0, None).temperature == 1.0  # OpenAI's default


@pytest.mark.parametrize("body, status, code, param", [
    ({"model": "m", "prompt": "x", "frobnicate": 1}, 400, "unknown_field", "frobnicate"),
    ({"model": "m", "prompt": "x", "echo": True}, 400, "unsupported_field", "echo"),
    ({"model": "m", "prompt": "x", "logit_bias": {"5": 10}}, 400, "unsupported_field", "logit_bias"),
    ({"model": "m", "prompt": "x", "best_of": 3}, 400, "unsupported_field", "best_of"),
    ({"model": "m", "prompt": "x", "temperature": 3}, 400, "invalid_value", "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p"),
    ({"model": "m", "prompt": "x", "logprobs": 9}, 400, "invalid_value", "logprobs"),
    ({"model": "m", "prompt": "x", "n": 0}, 400, "invalid_value", "n"),
    ({"prompt": "x"}, 400, "invalid_value", "model"),
    ({"model": "m", "prompt": [1, 2]}, 400, "invalid_value", "prompt[0]"),  # token ids: not supported
])
def test_completions_fields_refused_by_name(body, status, code, param):
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, param)
    assert param in caught.value.message or code == "invalid_value"


@pytest.mark.parametrize("body, code, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported_field", "tools"),
    ({"response_format": {"type": "json_object"}}, "unsupported_field", "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "invalid_value", "messages[0].content[0].type"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"top_logprobs": 30, "logprobs": True}, "invalid_value", "top_logprobs"),
])
def test_chat_fields_refused_by_name(body, code, param):
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | body
    with pytest.raises(ApiError) as caught:
        parse(full, ChatBody)
    assert (caught.value.code, caught.value.param) == (code, param)


def test_chat_cross_field_checks_and_no_op_values():
    ok = parse({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}],
                "response_format": {"type": "text"}, "tools": [], "logprobs": True, "top_logprobs": 3,
                "max_completion_tokens": 7}, ChatBody)
    assert ok.turns()[0] == {"role": "system", "content": "be brief"} and ok.turns()[1]["content"] == "hi"
    assert (ok.requested_max_tokens(), ok.requested_logprobs()) == (7, 3)
    for body, param in [({"top_logprobs": 2}, "top_logprobs"), ({"stream_options": {"include_usage": True}},
                                                                 "stream_options"), ({"n": 9}, "n"),
                        ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]:
        parsed = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}]} | body, ChatBody)
        with pytest.raises(ApiError) as caught:
            parsed.check(max_n=8)
        assert caught.value.param == param


def test_bad_json_and_error_shape():
    with pytest.raises(ApiError) as caught:
        parse_body(b"{not json", CompletionBody)
    assert caught.value.code == "invalid_json"
    assert error_body(429, "queue_full", "busy") == {"error": {"message": "busy", "type": "rate_limit_error",
                                                               "param": None, "code": "queue_full"}}


def words(ids):
    return "".join(ids)


def test_stop_strings_cut_before_the_match_and_hold_back_possible_prefixes():
    text = ChoiceText(words, stops=["END", "\n\n"])
    out = [text.add(piece, piece) for piece in ["Hel", "lo E", "N", "D more"]]
    assert [r.text for r in out] == ["Hel", "lo ", "", ""]  # "E" and "EN" may start "END": held back
    assert out[-1].stopped and text.final_text == "Hello "
    assert [r.tokens for r in out] == [["Hel"], [], [], []]  # "lo E" reaches past the cut: no logprob entry
    no_match = ChoiceText(words, stops=["END"])
    assert no_match.add("E", 1).text == "" and no_match.finish().text == "E"  # released at the end
    plain = ChoiceText(words)
    assert [plain.add(p, i).text for i, p in enumerate(["a", "b"])] == ["a", "b"] and plain.finish().text == ""


def test_incremental_decoding_equals_a_full_decode_through_multi_byte_characters():
    """A byte-level BPE splits emoji and accents over tokens: text waits for the character to complete."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["héllo wörld ça va? 日本語のテキスト 🤖 robots love space", "naïve café über straße 🚀🚀"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>")

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    for text, stops, expected in [(corpus[0], (), corpus[0]), ("über 🚀 naïve", ["🚀"], "über "),
                                  ("🤖日本 ça", ["本 ç"], "🤖日")]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        choice = ChoiceText(decode, stops)
        pieces = [choice.add(i).text for i in ids] + [choice.finish().text]
        assert "".join(pieces) == expected == choice.final_text
        assert all("\ufffd" not in piece for piece in pieces)
    rng = random.Random(0)
    for _ in range(100):  # any id sequence, valid UTF-8 or not, ends as the full decode
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        choice = ChoiceText(decode)
        assert "".join([choice.add(i).text for i in ids] + [choice.finish().text]) == decode(ids)
