"""What the adapter and token stores do with their objects, over the package's one filesystem
layer (``oppu.fsutil``)."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from oppu import fsutil


def open_root(root_uri: str, storage_options: dict[str, Any] | None = None
              ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a store at ``root_uri`` (a plain path, ``file://`` or ``s3://``).

    ``fsutil.filesystem`` opens it (endpoint and credentials from ``storage_options`` or the
    ``AWS_*`` environment), set for small files: everything a store holds is small.
    """
    fs, root = fsutil.filesystem(root_uri, storage_options, small_files=True)
    return fs, root.rstrip("/")


def list_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Every file below ``path`` (none if it does not exist), fresh from the store.

    ``find`` without a depth limit is one paginated listing on an object store, where a glob
    would list each "directory" separately.
    """
    fs.invalidate_cache(path)
    return fs.find(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Key-sorted, whitespace-free JSON: equal values give equal bytes, hence equal hashes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` so that a concurrent reader sees either nothing or all of ``data``.

    An object store's PUT is already all-or-nothing; a local file is written under a temporary
    name in the same directory and renamed over the target, which POSIX makes atomic.
    """
    if isinstance(fs, LocalFileSystem):
        parent = path.rsplit("/", 1)[0]
        temp_path = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{secrets.token_hex(4)}"
        fs.pipe_file(temp_path, data)
        fs.mv(temp_path, path)
    else:
        fs.pipe_file(path, data)
