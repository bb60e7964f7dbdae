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


MOVIE_TAGS = ("comedy", "action", "romance", "classic")


def build_movie_tag_base(out_dir, seed: int = 0):
    """A one-layer tiny default model (local tokenizer, 3 pretraining steps) on LaMP-2M-like lines;
    returns its directory. Not cached: each test module builds its own in about a second. Another
    ``seed`` gives other weights (another base fingerprint) with the same tokenizer."""
    from oppu.models import TinyModelConfig, build_tiny_base

    corpus = [f"description: movie {i} with jokes and a {MOVIE_TAGS[i % 4]} feel tag: {MOVIE_TAGS[i % 4]}"
              for i in range(200)]
    config = TinyModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                             intermediate_size=64, pretrain_steps=3, pretrain_batch_size=4,
                             pretrain_seq_len=32, num_threads=1)
    return build_tiny_base(corpus, out_dir, config, seed=seed, use_cache=False)


def movie_user(user_id: str, n: int, offset: int = 0):
    """A test user with ``n`` dated LaMP-2M-like history items whose tag cycles from ``offset``."""
    from oppu.data.records import HistoryItem, UserData

    history = [HistoryItem(id=f"{user_id}-{i}", date=f"2020-01-{i + 1:02d}", fields={
        "description": f"movie {i} with jokes number {i + offset} and a {MOVIE_TAGS[(i + offset) % 4]} feel",
        "tag": MOVIE_TAGS[(i + offset) % 4]}) for i in range(n)]
    return UserData(user_id=user_id, role="test", history=history, queries=[])
