from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest
import torch

from oppu.errors import OppuError
from oppu.models.fingerprint import base_fingerprint
from oppu.models.loading import is_hub_id, load_model, resolve_model_dir


def test_load_from_a_local_dir_gives_eval_model_and_left_padding_tokenizer(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_load_from_a_file_uri_gives_the_same_weights(tiny_model_dir, tiny_model):
    model, _ = load_model(f"file://{tiny_model_dir}", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = tiny_model[0].state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor.float(), reference[name].to(torch.bfloat16).float())


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "nopad")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(copy)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(copy)
    assert AutoTokenizer.from_pretrained(copy).pad_token_id is None
    _, loaded = load_model(copy)
    assert loaded.pad_token_id == loaded.eos_token_id


@pytest.fixture
def remote_model(tiny_model_dir):
    """The tiny model copied into fsspec's in-memory file system, plus a file that is not needed."""
    fs = fsspec.filesystem("memory")
    root = "/oppu-test-models/tiny"
    for path in Path(tiny_model_dir).iterdir():
        if path.is_file() and not path.name.startswith("."):
            fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    fs.pipe_file(f"{root}/training_log.txt", b"not part of the model")
    yield fs, root
    fs.rm(root, recursive=True)


def test_fsspec_uri_is_downloaded_once_into_the_cache(remote_model, tiny_model_dir, tmp_path, monkeypatch):
    fs, root = remote_model
    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"memory://{root}"
    local = resolve_model_dir(uri)
    assert local.is_relative_to(tmp_path / "cache" / "models")
    assert not (local / "training_log.txt").exists()
    assert base_fingerprint(local) == base_fingerprint(tiny_model_dir)

    downloads = []
    monkeypatch.setattr(type(fs), "get_file", lambda self, *a, **k: downloads.append(a))
    assert resolve_model_dir(uri) == local
    assert downloads == []  # unchanged remote: the cache is reused
    monkeypatch.undo()

    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))
    fs.pipe_file(f"{root}/config.json", fs.cat_file(f"{root}/config.json") + b"\n")
    assert resolve_model_dir(uri) == local
    assert (local / "config.json").read_bytes().endswith(b"\n")  # changed remote: downloaded again
    model, tokenizer = load_model(uri)
    assert model.config.vocab_size == len(tokenizer)


def test_concurrent_resolves_share_one_download(remote_model, tmp_path, monkeypatch):
    fs, root = remote_model
    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))
    fetched = []
    real_get_file = type(fs).get_file
    monkeypatch.setattr(type(fs), "get_file", lambda self, rpath, lpath, **kw: (
        fetched.append(rpath), real_get_file(self, rpath, lpath, **kw))[1])
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: resolve_model_dir(f"memory://{root}"), range(4)))
    assert len(dirs) == 1
    assert len(fetched) == len(set(fetched)) == len([p for p in dirs.pop().iterdir() if not p.name.startswith(".")])


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(OppuError, match="does not exist"):
        load_model(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OppuError, match="has no config.json"):
        resolve_model_dir(f"file://{tmp_path / 'empty'}")
    with pytest.raises(OppuError, match="nothing is stored there|no config.json"):
        resolve_model_dir("memory:///oppu-test-models/absent")


@pytest.mark.parametrize(("uri", "hub"), [
    ("meta-llama/Llama-2-7b-hf", True),
    ("gpt2", True),
    ("./models/tiny", False),
    ("/abs/path/model", False),
    ("models/base/tiny", False),
    ("s3://bucket/prefix/model", False),
    ("file:///tmp/model", False),
])
def test_hub_ids_are_told_from_paths_and_uris(uri, hub):
    assert is_hub_id(uri) is hub
