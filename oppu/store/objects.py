"""The one filesystem layer under the adapter and token stores: fsspec over a root URI."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def open_root(root_uri: str, storage_options: dict[str, Any] | None = None
              ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of ``root_uri`` (a plain path, ``file://`` or ``s3://``).

    S3 endpoints and credentials come from ``storage_options`` or, as botocore reads them, from
    the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
    """
    fs, root = fsspec.core.url_to_fs(root_uri, **(storage_options or {}))
    return fs, root.rstrip("/")


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
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        temp_path = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{secrets.token_hex(4)}"
        fs.pipe_file(temp_path, data)
        fs.mv(temp_path, path)
    else:
        fs.pipe_file(path, data)
