from __future__ import annotations

import json
import time

import pytest

from oppu.errors import ConfigError
from oppu.models.fingerprint import base_fingerprint
from oppu.models.tiny import BUILD_RECORD, TinyModelConfig, build_hash, build_tiny_base, train_tokenizer

from .conftest import TEST_MODEL_CONFIG, make_corpus


@pytest.mark.parametrize("text", [
    "description: the robot tells a story. tag: sci-fi",
    "  two spaces,\ttabs,\nnew lines and \u00e9t\u00e9 \u2014 caf\u00e9 \U0001f3ac!",
    "",
])
def test_tokenizer_round_trips_any_text(text):
    tokenizer = train_tokenizer(make_corpus(40), TEST_MODEL_CONFIG)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *ids]


def test_tokenizer_has_the_special_tokens_and_learns_corpus_words():
    tokenizer = train_tokenizer(make_corpus(40), TEST_MODEL_CONFIG)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert len(tokenizer(" robot", add_special_tokens=False)["input_ids"]) == 1
    assert 260 < len(tokenizer) <= TEST_MODEL_CONFIG.vocab_size


def test_build_is_a_loadable_pretrained_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == TEST_MODEL_CONFIG.hidden_size
    assert (tiny_model_dir / "model.safetensors").is_file()
    record = json.loads((tiny_model_dir / BUILD_RECORD).read_text())
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["final_train_loss"] < record["initial_train_loss"] - 1.0  # pretraining learned something


def test_second_build_returns_at_once_and_a_new_dir_is_filled_from_the_cache(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="oppu")
    corpus = make_corpus()
    started = time.perf_counter()
    assert build_tiny_base(corpus, tiny_model_dir, TEST_MODEL_CONFIG, seed=0) == tiny_model_dir
    assert time.perf_counter() - started < 1.0
    fresh = build_tiny_base(corpus, tmp_path / "again", TEST_MODEL_CONFIG, seed=0)
    assert "reusing the cached build" in caplog.text
    assert base_fingerprint(fresh) == base_fingerprint(tiny_model_dir)


def test_an_existing_dir_with_a_stale_model_is_overwritten_from_the_cache(tiny_model_dir, tmp_path):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / BUILD_RECORD).write_text('{"build_hash": "old"}')
    assert build_tiny_base(make_corpus(), stale, TEST_MODEL_CONFIG, seed=0) == stale
    assert (stale / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert base_fingerprint(stale) == base_fingerprint(tiny_model_dir)


def test_build_hash_follows_config_corpus_and_seed_but_not_logging():
    corpus = make_corpus(20)
    key = build_hash(corpus, TEST_MODEL_CONFIG, 0)
    assert build_hash(corpus, TEST_MODEL_CONFIG, 1) != key
    assert build_hash(corpus[:-1], TEST_MODEL_CONFIG, 0) != key
    assert build_hash(corpus, TinyModelConfig(**{**vars(TEST_MODEL_CONFIG), "hidden_size": 64}), 0) != key
    assert build_hash(corpus, TinyModelConfig(**{**vars(TEST_MODEL_CONFIG), "log_every_steps": 7}), 0) == key


@pytest.mark.parametrize(("change", "named"), [
    ({"num_heads": 5}, "num_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"pretrain_seq_len": 4096}, "pretrain_seq_len"),
    ({"vocab_size": 100}, "vocab_size"),
])
def test_bad_config_names_the_key(change, named):
    with pytest.raises(ConfigError, match=named):
        TinyModelConfig(**change)


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="corpus"):
        build_tiny_base(["", ""], tmp_path / "none", TEST_MODEL_CONFIG)
