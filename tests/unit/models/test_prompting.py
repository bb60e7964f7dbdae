"""Prompt formats: plain text after BOS, or the user turn of the model's chat template."""

from __future__ import annotations

import copy

import pytest

from oppu.errors import ConfigError
from oppu.models.generation import generate_greedy
from oppu.models.prompting import chat_frame, chat_text, resolve_prompt_format
from oppu.models.samples import IGNORE_INDEX, encode_prompt, encode_sample
from oppu.tasks.base import TrainingSample

# SmolLM2-Instruct's template (ChatML with a default system turn), spelled with the tiny
# tokenizer's own special tokens so every piece tokenizes.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ bos_token + 'system\\nYou are helpful.' + eos_token + '\\n' }}{% endif %}"
          "{{ bos_token + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
PROMPT = "description: the robot tells a story about the old city. tag:"
TARGET = " sci-fi"


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model):
    return tiny_model[1]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model):
    tokenizer = copy.deepcopy(tiny_model[1])
    tokenizer.chat_template = CHATML
    return tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_auto_follows_the_tokenizer_and_chat_needs_a_template(plain_tokenizer, chat_tokenizer):
    assert resolve_prompt_format("auto", plain_tokenizer) == "plain"
    assert resolve_prompt_format("auto", chat_tokenizer) == "chat"
    assert resolve_prompt_format("plain", chat_tokenizer) == "plain"
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_prompt_format("chat", plain_tokenizer)


def test_chat_prompt_is_the_templates_user_turn(chat_tokenizer):
    encoded = encode_prompt(chat_tokenizer, PROMPT, prompt_format="chat")
    rendered = chat_text(chat_tokenizer, PROMPT)
    assert rendered.endswith("assistant\n") and PROMPT in rendered
    assert chat_tokenizer.decode(encoded) == chat_tokenizer.decode(ids(chat_tokenizer, rendered))
    # No BOS of its own in front: the template's first token leads.
    assert encoded[:len(chat_frame(chat_tokenizer)[0])] == chat_frame(chat_tokenizer)[0]


def test_chat_sample_trains_the_answer_and_end_of_turn_only(chat_tokenizer):
    encoded = encode_sample(chat_tokenizer, TrainingSample(PROMPT, TARGET), 256, prompt_format="chat")
    prompt_ids = encode_prompt(chat_tokenizer, PROMPT, prompt_format="chat")
    assert encoded["input_ids"][:len(prompt_ids)] == prompt_ids  # generation sees these very ids
    assert encoded["labels"][:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    trained = encoded["input_ids"][len(prompt_ids):]
    assert encoded["labels"][len(prompt_ids):] == trained
    assert trained[-1] == chat_tokenizer.eos_token_id
    assert chat_tokenizer.decode(trained[:-1]) == "sci-fi"  # the separator space is not the answer's


def test_a_long_chat_prompt_loses_its_left_but_keeps_the_frame(chat_tokenizer):
    head, tail = chat_frame(chat_tokenizer)
    long_prompt = "the old city " * 60 + PROMPT
    encoded = encode_sample(chat_tokenizer, TrainingSample(long_prompt, TARGET), 64, prompt_format="chat")
    assert len(encoded["input_ids"]) == 64
    assert encoded["input_ids"][:len(head)] == head
    n_trained = sum(label != IGNORE_INDEX for label in encoded["labels"])
    assert encoded["input_ids"][64 - n_trained - len(tail):64 - n_trained] == tail
    kept = encode_prompt(chat_tokenizer, long_prompt, max_prompt_tokens=10, prompt_format="chat")
    assert kept == head + ids(chat_tokenizer, long_prompt)[-10:] + tail


def test_next_token_history_stays_plain_text_in_chat_format(chat_tokenizer):
    text = "a paper about robots and the old city"
    chat = encode_sample(chat_tokenizer, TrainingSample("", text), 256, prompt_format="chat")
    plain = encode_sample(chat_tokenizer, TrainingSample("", text), 256)
    assert chat == plain


def test_generation_uses_the_same_chat_ids(tiny_model, chat_tokenizer):
    model = tiny_model[0]
    chat = generate_greedy(model, chat_tokenizer, [PROMPT], max_new_tokens=4, prompt_format="chat")
    plain = generate_greedy(model, chat_tokenizer, [PROMPT], max_new_tokens=4)
    # The tiny model was never trained on the frame, so the two prompts differ in what follows;
    # what matters is that the chat path decodes from chat ids (checked against a hand-made call).
    import torch

    prompt_ids = torch.tensor([encode_prompt(chat_tokenizer, PROMPT, prompt_format="chat")])
    with torch.inference_mode():
        out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                             max_new_tokens=4, do_sample=False, pad_token_id=chat_tokenizer.pad_token_id)
    continuation = out[0, prompt_ids.shape[1]:].tolist()
    if chat_tokenizer.eos_token_id in continuation:
        continuation = continuation[:continuation.index(chat_tokenizer.eos_token_id)]
    assert chat == [chat_tokenizer.decode(continuation, skip_special_tokens=True)]
    assert isinstance(plain[0], str)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_encoding_many_samples_at_once_equals_one_at_a_time(plain_tokenizer, chat_tokenizer, fmt):
    from oppu.models.samples import encode_samples

    tokenizer = chat_tokenizer if fmt == "chat" else plain_tokenizer
    samples = [TrainingSample(PROMPT, TARGET), TrainingSample("", "the whole history text"),
               TrainingSample(PROMPT * 6, TARGET), TrainingSample("tag:", "comedy"),
               TrainingSample("description: a love story about war", " romance " * 20), TrainingSample("x", "")]
    for max_length in ((12, 40, 256) if fmt == "plain" else (48, 80, 256)):  # the chat frame: 41 tokens
        assert encode_samples(tokenizer, samples, max_length, fmt) == [
            encode_sample(tokenizer, s, max_length, fmt) for s in samples]
    assert encode_samples(tokenizer, [], 40, fmt) == []
