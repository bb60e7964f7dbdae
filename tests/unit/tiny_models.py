"""Random-weight tiny Llamas and the one-thread fixture shared by the multi-LoRA, batched-training,
serving and user-training tests (their models are too small to gain from more threads)."""

from __future__ import annotations

import pytest


def tiny_llama(vocab_size: int = 64, intermediate_size: int = 64, seed: int = 0, **config):
    """A 2-layer, 32-wide ``LlamaForCausalLM`` with seeded random weights, in eval mode."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, **config)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Use as ``pytestmark = pytest.mark.usefixtures("one_thread")`` (with ``from ... import one_thread``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
