"""One filesystem layer for run directories, data sets and models: local paths or any fsspec URI."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for ``uri``; S3 endpoint from AWS_ENDPOINT_URL."""
    import fsspec

    return fsspec.core.url_to_fs(uri)


def write_text(uri: str, text: str) -> None:
    """Write text atomically where the filesystem allows (local: temp file then rename)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open(path, "w") as fh:
            fh.write(text)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(text)
    os.replace(fh.name, path)


def read_text(uri: str) -> str:
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open(path, "r") as fh:
            return fh.read()
    return local_path(uri).read_text()


def write_json(uri: str, data: Any) -> None:
    write_text(uri, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def exists(uri: str) -> bool:
    if is_remote(uri):
        fs, path = filesystem(uri)
        return fs.exists(path)
    return local_path(uri).exists()


def publish_dir(local_dir: str | Path, uri: str) -> str:
    """Copy a finished local directory to ``uri`` (replacing what was there); returns ``uri``.

    Locally the copy goes to a sibling temp dir first and is renamed into place, so a reader
    never sees a half-written model.
    """
    local_dir = Path(local_dir)
    if is_remote(uri):
        fs, path = filesystem(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.put(str(local_dir), path, recursive=True)
        return uri
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    shutil.rmtree(staging)
    shutil.copytree(local_dir, staging)
    if target.exists():
        old = target.with_name(f".{target.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    return uri
