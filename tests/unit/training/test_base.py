"""Base-adaptation pieces that need no Ray: its config keys and the Ray Train run's name."""

from __future__ import annotations

import re

import pytest

from oppu.errors import ConfigError
from oppu.run_config import BaseStage
from oppu.training.base_state import run_name


def flavour(name: str, samples: int = 10, target: str = "/runs/a") -> dict:
    return {"flavour": name, "n_samples": samples, "epochs": 2, "provenance": {"flavour": name, "samples": samples},
            "target": f"{target}/base-{name}", "dataset": f"train-{name}"}


TRAIN_CONFIG = {"model": "m", "optim": {"lr": 1e-4}, "seed": 0, "checkpoint_every_steps": 50,
                "deepspeed": None, "flavours": [flavour("plain")]}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("checkpoint_every_steps", -1, "base.checkpoint_every_steps must be >= 0 (0: none within an epoch), got -1"),
    ("max_failures", -2, "base.max_failures must be >= -1 (-1: unlimited), got -2"),
])
def test_checkpoint_keys_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        BaseStage(**{key: value})


def test_checkpoint_defaults():
    stage = BaseStage()
    assert (stage.checkpoint_every_steps, stage.max_failures) == (50, 2)
    assert BaseStage(checkpoint_every_steps=0, max_failures=-1).checkpoint_every_steps == 0


def test_a_run_is_named_by_what_its_checkpoints_depend_on():
    """Ray Train resumes a run from the latest checkpoint stored under its name: a run with other
    settings, other flavours or another worker count must get another name; the checkpoint
    interval, where the bases go and which were published already when it started must not."""
    name = run_name("LaMP_2M", TRAIN_CONFIG, 2)
    assert name.startswith("oppu-base-LaMP_2M-plain-")
    assert run_name("LaMP_2M", {**TRAIN_CONFIG, "checkpoint_every_steps": 7}, 2) == name
    assert run_name("LaMP_2M", {**TRAIN_CONFIG, "checkpoint_each_epoch": False}, 2) == name
    assert run_name("LaMP_2M", {**TRAIN_CONFIG, "flavours": [flavour("plain", target="/elsewhere")]}, 2) == name
    assert run_name("LaMP_2M", {**TRAIN_CONFIG, "flavours": [{**flavour("plain"), "dataset": None}]}, 2) == name
    assert run_name("LaMP_2M", {**TRAIN_CONFIG, "optim": {"lr": 2e-4}}, 2) != name
    assert run_name("LaMP_2M", {**TRAIN_CONFIG, "flavours": [flavour("plain", samples=11)]}, 2) != name
    assert run_name("LaMP_2M", TRAIN_CONFIG, 1) != name


def test_a_run_of_several_flavours_is_named_by_every_one():
    both = {**TRAIN_CONFIG, "flavours": [flavour("plain"), flavour("rag-k1")]}
    name = run_name("LaMP_2M", both, 1)
    assert name.startswith("oppu-base-LaMP_2M-2-flavours-")
    assert run_name("LaMP_2M", {**both, "flavours": [flavour("plain"), flavour("rag-k1", samples=9)]}, 1) != name
    assert run_name("LaMP_2M", {**both, "flavours": [flavour("rag-k1"), flavour("plain")]}, 1) != name


def tied_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, vocab_size=64,
                                        tie_word_embeddings=True))


def test_a_host_copy_keeps_tied_weights_shared_so_the_published_base_writes_them_once(tmp_path):
    """ZeRO-3's merged state is copied out of the gathered buffers before saving; a plain copy per
    name had untied a tied output head, and the published base got a second ``lm_head.weight``
    (found running tests/gpu/test_base_gpu.py's ZeRO-3 case on the CPU)."""
    from safetensors import safe_open

    from oppu.training.base_state import host_copy

    model = tied_llama()
    state = model.state_dict()
    copied = host_copy(state)
    assert copied.keys() == state.keys()
    assert copied["lm_head.weight"] is copied["model.embed_tokens.weight"]
    for name, tensor in state.items():
        assert copied[name].equal(tensor) and copied[name].data_ptr() != tensor.data_ptr(), name

    def saved_keys(directory, **kwargs) -> set[str]:
        model.save_pretrained(directory, safe_serialization=True, **kwargs)
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return set(f.keys())

    as_the_model_saves = saved_keys(tmp_path / "model")
    assert "lm_head.weight" not in as_the_model_saves
    assert saved_keys(tmp_path / "copied", state_dict=copied) == as_the_model_saves
    untied = {name: tensor.detach().clone() for name, tensor in state.items()}
    assert saved_keys(tmp_path / "untied", state_dict=untied) == as_the_model_saves | {"lm_head.weight"}


def test_a_published_bases_stats_line_says_where_the_last_epoch_went(tmp_path):
    import json

    from oppu.training.base import BASE_TRAIN_STATS, _stats_line

    stats = {"setup_s": 7.0, "engine_init_s": 2.0, "train_s": 43.0, "merge_s": 0.4, "loss": 0.2551,
             "tokens_per_s": 61234.5, "step": 126, "resumed_from_step": 0,
             "last_epoch_s": {"data": 1.5, "encode": 6.25, "step": 12.0, "checkpoint": 0.0}}
    (tmp_path / BASE_TRAIN_STATS).write_text(json.dumps(stats))
    line = _stats_line(str(tmp_path))
    assert "train 43s (last epoch: data 1.5s, encode 6.2s, step 12.0s, checkpoint 0.0s)" in line
    assert "61,234 tokens/s" in line and "126 steps" in line
    del stats["last_epoch_s"]  # a base published before the split was kept
    (tmp_path / BASE_TRAIN_STATS).write_text(json.dumps(stats))
    assert "train 43s, merge+save" in _stats_line(str(tmp_path))
    assert _stats_line(str(tmp_path / "nowhere")) == "no training stats"
