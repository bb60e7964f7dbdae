"""Models: loading any Hugging Face causal LM, the tiny local default, fingerprints, samples, decoding.

Names are imported on first use so ``import oppu.models`` does not pull in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "load_model": "oppu.models.loading",
    "resolve_model_dir": "oppu.models.loading",
    "base_fingerprint": "oppu.models.fingerprint",
    "TinyModelConfig": "oppu.models.tiny",
    "build_tiny_base": "oppu.models.tiny",
    "encode_sample": "oppu.models.samples",
    "encode_samples": "oppu.models.samples",
    "encode_prompt": "oppu.models.samples",
    "collate": "oppu.models.samples",
    "IGNORE_INDEX": "oppu.models.samples",
    "generate_greedy": "oppu.models.generation",
}

__all__ = [
    "IGNORE_INDEX", "TinyModelConfig", "base_fingerprint", "build_tiny_base", "collate", "encode_prompt",
    "encode_sample", "encode_samples", "generate_greedy", "load_model", "resolve_model_dir",
]

if TYPE_CHECKING:
    from oppu.models.fingerprint import base_fingerprint
    from oppu.models.generation import generate_greedy
    from oppu.models.loading import load_model, resolve_model_dir
    from oppu.models.samples import IGNORE_INDEX, collate, encode_prompt, encode_sample, encode_samples
    from oppu.models.tiny import TinyModelConfig, build_tiny_base


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'oppu.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
