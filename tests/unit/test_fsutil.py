"""The one filesystem layer: every filesystem is opened by ``fsutil.filesystem`` with options from
``fsutil.storage_options``, so the stores, data sets, models and Ray Data reads agree on S3."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from oppu import fsutil

OPPU = Path(__file__).resolve().parents[1].parent / "oppu"


def test_s3_options_come_from_one_place():
    given = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"}
    assert fsutil.storage_options("s3://bucket/run", given) == given
    assert fsutil.storage_options("s3://bucket/run", given, small_files=True) == {**given, "max_concurrency": 1}
    assert fsutil.storage_options("s3://bucket/run", {"max_concurrency": 4}, small_files=True) == {
        "max_concurrency": 4}  # what the caller gives wins
    assert fsutil.storage_options("/tmp/store", small_files=True) == {}


def test_s3_filesystem_is_built_with_those_options(monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    given = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "skip_instance_cache": True}
    fs, path = fsutil.filesystem("s3://bucket/run/adapters/", given, small_files=True)
    assert path.rstrip("/") == "bucket/run/adapters"
    assert fs.max_concurrency == 1 and fs.endpoint_url == "http://127.0.0.1:9" and fs.key == "k"
    model_fs, _ = fsutil.filesystem("s3://bucket/run/base", given)
    assert model_fs.max_concurrency > 1  # large files keep concurrent transfers


def test_store_opens_its_root_through_the_layer(tmp_path):
    from oppu.store.objects import open_root

    fs, root = open_root(str(tmp_path / "store") + "/")
    assert root == str(tmp_path / "store") and fs.auto_mkdir  # writes create their parents
    fs.pipe_file(f"{root}/a/b/c.json", b"{}")
    assert (tmp_path / "store" / "a" / "b" / "c.json").read_bytes() == b"{}"


def test_ray_reads_remote_uris_through_the_layer(tmp_path):
    assert fsutil.ray_filesystem(str(tmp_path / "users.parquet")) is None
    assert fsutil.ray_filesystem(f"file://{tmp_path}/users.parquet") is None
    assert fsutil.ray_filesystem("memory://run/users.parquet") is not None


def test_no_module_opens_a_filesystem_itself():
    """fsspec's filesystem constructors are called in fsutil alone."""
    opening = {"url_to_fs", "filesystem", "open", "open_files", "get_mapper"}
    offenders = []
    for path in sorted(OPPU.rglob("*.py")):
        if path == OPPU / "fsutil.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr in opening and isinstance(node.value, ast.Name | ast.Attribute)
                    and "fsspec" in ast.unparse(node.value)):
                offenders.append(f"{path.relative_to(OPPU.parent)}:{node.lineno}")
    assert offenders == []
