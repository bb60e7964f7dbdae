"""A tiny pretrained base built once per test session (a few seconds) for the model tests."""

from __future__ import annotations

import random

import pytest

from oppu.models.tiny import TinyModelConfig

WORDS = ("the", "movie", "tells", "a", "story", "about", "old", "city", "robot", "love", "war", "space",
         "family", "secret", "ending", "dark", "funny", "book", "true", "dream")
TAGS = ("sci-fi", "comedy", "romance", "classic", "dystopia")

# Small enough to build in seconds on 2 busy cores, large enough that pretraining lowers the loss.
TEST_MODEL_CONFIG = TinyModelConfig(
    vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
    max_position_embeddings=256, pretrain_steps=40, pretrain_batch_size=8, pretrain_seq_len=32,
    pretrain_lr=1e-2, pretrain_warmup_steps=4, num_threads=1, log_every_steps=20,
)


def make_corpus(n_documents: int = 150, seed: int = 0) -> list[str]:
    """LaMP-2M-like lines: a description, then the tag; the tag follows from the description's words."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(n_documents):
        tag = rng.choice(TAGS)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        corpus.append(f"description: {words}, a {tag} film. tag: {tag}")
    return corpus


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    """``OPPU_CACHE_DIR`` for the whole session, so no test writes to the home directory."""
    path = tmp_path_factory.mktemp("oppu-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPPU_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache_dir, tmp_path_factory):
    from oppu.models.tiny import build_tiny_base

    return build_tiny_base(make_corpus(), tmp_path_factory.mktemp("tiny") / "base", TEST_MODEL_CONFIG, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from oppu.models import load_model

    return load_model(tiny_model_dir)
