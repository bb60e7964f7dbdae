"""The one filesystem layer: run directories, data sets, models and the adapter store, as local
paths or any fsspec URI (``file://``, ``s3://``).

Every filesystem the package opens comes from :func:`filesystem`, so the S3 settings are made in
one place (:func:`storage_options`): endpoint and credentials from the caller's
``storage_options`` or, as botocore reads them, from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...), and one transfer setting that depends on
what is stored (``small_files``).
"""

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


def storage_options(uri: str, given: dict[str, Any] | None = None, *, small_files: bool = False) -> dict[str, Any]:
    """The fsspec options :func:`filesystem` opens ``uri`` with: ``given``, over the package's defaults.

    ``small_files``: every object is small (adapters, manifests, tokens). Then s3fs transfers
    each file in one request: with per-file transfer concurrency on, it sends a HEAD for the size
    before every GET, twice the round trips. Large files (model weights) keep s3fs's concurrent
    ranged transfers.
    """
    options = dict(given or {})
    if small_files and uri.startswith(("s3://", "s3a://")):
        options.setdefault("max_concurrency", 1)
    return options


def filesystem(uri: str, given_options: dict[str, Any] | None = None, *, small_files: bool = False):
    """(fsspec filesystem, path within it) for ``uri``, opened with :func:`storage_options`.

    A local filesystem creates the parents of what it writes, as an object store needs none.
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, given_options, small_files=small_files))
    if isinstance(fs, LocalFileSystem) and not fs.auto_mkdir:
        fs = LocalFileSystem(auto_mkdir=True)
    return fs, path


def ray_filesystem(uri: str):
    """The filesystem to hand Ray Data for reading ``uri`` (``filesystem=``): this layer's for a
    remote URI, so Ray reads S3 with the same settings; ``None`` for a local path (Ray's own)."""
    return filesystem(uri)[0] if is_remote(uri) else None


def write_text(uri: str, text: str) -> None:
    """Write text atomically where the filesystem allows (see ``write_bytes``)."""
    write_bytes(uri, text.encode())


def write_bytes(uri: str, data: bytes) -> None:
    """Replace the file at ``uri`` whole: locally a temp file renamed into place, remotely one
    object PUT (a reader sees the old object or the new one, never part of either)."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(data)
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


MARKER_FILE = "config.json"  # what every reader of a model directory looks for first


def publish_dir(local_dir: str | Path, uri: str) -> str:
    """Copy a finished local directory to ``uri`` (replacing what was there); returns ``uri``.

    The old directory is replaced only once the new one is complete where it is going, and a
    reader never sees a half-written one:

    - locally the copy goes to a sibling temp dir first and is renamed into place;
    - an object store has no rename (:func:`_publish_remote`): the new tree is uploaded to a
      sibling staging prefix first (an upload that fails leaves the old one untouched), then
      swapped in by server-side copies with ``config.json``, the file readers look for first,
      removed first and written last: during the swap (copies, no upload) a reader finds no
      model rather than a mix, and the model loader re-checks ``config.json`` after downloading.
    """
    local_dir = Path(local_dir)
    if is_remote(uri):
        _publish_remote(local_dir, uri)
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


def _publish_remote(local_dir: Path, uri: str) -> None:
    """``publish_dir`` on an object store: stage, then swap with the marker last (see there)."""
    import secrets

    fs, path = filesystem(uri)
    path = path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    staging = f"{parent}/.{name}.staging-{secrets.token_hex(4)}"
    new_files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    try:
        fs.put(str(local_dir), staging, recursive=True)
        fs.invalidate_cache(staging)
        staged = {f[len(staging) + 1:] for f in fs.find(staging)}
        if missing := sorted(set(new_files) - staged):
            raise OSError(f"publishing {local_dir} to {uri}: {missing} did not arrive at {staging}")
        fs.invalidate_cache(path)
        old_files = {f[len(path) + 1:] for f in fs.find(path)} if fs.exists(path) else set()
        if MARKER_FILE in old_files:
            fs.rm_file(f"{path}/{MARKER_FILE}")  # from here readers find no model, not a mix
        for rel in new_files:
            if rel != MARKER_FILE:
                fs.copy(f"{staging}/{rel}", f"{path}/{rel}")
        stale = sorted(old_files - set(new_files) - {MARKER_FILE})
        if stale:
            fs.rm([f"{path}/{rel}" for rel in stale])
        if MARKER_FILE in new_files:
            fs.copy(f"{staging}/{MARKER_FILE}", f"{path}/{MARKER_FILE}")
    finally:
        try:
            fs.rm(staging, recursive=True)
        except FileNotFoundError:
            pass
