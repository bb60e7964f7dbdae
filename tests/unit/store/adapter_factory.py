"""Adapter directories for store tests: a real tiny PEFT LoRA adapter, or a cheap look-alike."""

from __future__ import annotations

import json
from pathlib import Path


def make_tiny_peft_adapter(out_dir: Path, seed: int = 0):
    """A real LoRA adapter on a 2-layer Llama, saved the way training saves it; returns the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    # Non-zero B matrices, so a lost or swapped weight file changes the loaded adapter.
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(out_dir)
    return model


def assert_same_lora_weights(expected_model, loaded_model) -> None:
    import torch

    expected = {n: p for n, p in expected_model.named_parameters() if "lora_" in n}
    actual = {n: p for n, p in loaded_model.named_parameters() if "lora_" in n}
    assert expected.keys() == actual.keys() and len(expected) == 8  # 2 layers x (q, v) x (A, B)
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name


def fake_adapter_dir(path: Path, weights: bytes = b"weights") -> Path:
    """The PEFT file layout with made-up bytes: enough for everything but loading."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path
