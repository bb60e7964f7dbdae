from __future__ import annotations

import json
import os
import shutil

import pytest

from oppu.models.fingerprint import FINGERPRINT_FILE, base_fingerprint


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model", ignore=shutil.ignore_patterns(".*"))


def flip_last_byte(path, keep_mtime: bool):
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_fingerprint_is_16_hex_and_the_same_for_a_copy_and_a_file_uri(tiny_model_dir, model_copy):
    fingerprint = base_fingerprint(model_copy)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert base_fingerprint(tiny_model_dir) == fingerprint
    assert base_fingerprint(f"file://{model_copy}") == fingerprint


def test_changed_weights_change_the_fingerprint(model_copy):
    before = base_fingerprint(model_copy)
    flip_last_byte(model_copy / "model.safetensors", keep_mtime=False)
    assert base_fingerprint(model_copy) != before


def test_changed_config_changes_it_and_other_files_do_not(model_copy):
    before = base_fingerprint(model_copy)
    (model_copy / "README.md").write_text("notes")
    (model_copy / "tokenizer.json").write_text((model_copy / "tokenizer.json").read_text() + " ")
    assert base_fingerprint(model_copy) == before
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert base_fingerprint(model_copy) != before


def test_second_call_uses_the_cache_keyed_by_size_and_mtime(model_copy):
    before = base_fingerprint(model_copy)
    assert json.loads((model_copy / FINGERPRINT_FILE).read_text())["fingerprint"] == before
    # Same size and mtime: the cached value is trusted, proving no bytes were read.
    flip_last_byte(model_copy / "model.safetensors", keep_mtime=True)
    assert base_fingerprint(model_copy) == before
    os.utime(model_copy / "model.safetensors")
    assert base_fingerprint(model_copy) != before
