"""The base model's fingerprint: the key adapters are stored under, so none is served on another base.

sha256 over ``config.json`` and every weight file (``*.safetensors``, ``*.bin``), each as its
relative name, its size and its bytes, in name order; read in chunks so a 13 GB checkpoint never
sits in memory. Hashing that much takes a while, so the result is kept next to the weights in
``.oppu-fingerprint.json`` together with each file's size and mtime; while those are unchanged
the next call only stats the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

FINGERPRINT_FILE = ".oppu-fingerprint.json"
FINGERPRINT_HEX_CHARS = 16
_CHUNK_BYTES = 8 * 1024 * 1024


def fingerprinted_files(model_dir: Path) -> list[Path]:
    """``config.json`` and the weight files under ``model_dir``, sorted by relative name."""
    files = [model_dir / "config.json"]
    files += [p for pattern in ("*.safetensors", "*.bin") for p in model_dir.rglob(pattern)
              if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)]
    return sorted(set(files), key=lambda p: p.relative_to(model_dir).as_posix())


def base_fingerprint(uri_or_dir: str | os.PathLike) -> str:
    """16 hex chars identifying the base model's config and weights (see the module docstring)."""
    from oppu.models.loading import resolve_model_dir

    model_dir = resolve_model_dir(uri_or_dir)
    files = fingerprinted_files(model_dir)
    stats = {p.relative_to(model_dir).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache_path = model_dir / FINGERPRINT_FILE
    cached = _read_cache(cache_path)
    if cached is not None and cached.get("files") == stats:
        return cached["fingerprint"]

    digest = hashlib.sha256()
    for path in files:
        name = path.relative_to(model_dir).as_posix().encode()
        digest.update(len(name).to_bytes(8, "big") + name + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
    fingerprint = digest.hexdigest()[:FINGERPRINT_HEX_CHARS]
    _write_cache(cache_path, {"fingerprint": fingerprint, "files": stats})
    return fingerprint


def _read_cache(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_cache(path: Path, content: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fingerprint-", dir=path.parent)
    except OSError:
        return  # a read-only model dir (shared cache, hub snapshot) just gets hashed every time
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
