"""What keeps a publish and a garbage collector apart, and what a publish refuses (issue #15).

A publisher holds a lease on its version folder while it uploads (``LEASE_NAME``: when it
expires, renewed as files go up); ``collect_incomplete`` never removes a folder under an
unexpired lease, and checks again just before removing. Before the manifest is written the
publisher lists its folder: a file that vanished (a collector that ran anyway) fails the publish,
so no manifest ever names a file that is not there at that moment. A weights file holding NaN or
infinite values is never published.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from fsspec import AbstractFileSystem

from oppu.errors import AdapterError
from oppu.store.manifest import (
    FILE_NAME_PATTERN,
    LEASE_NAME,
    MANIFEST_NAME,
    VERSION_PATTERN,
    AdapterKey,
    is_safe_file_name,
    version_time,
)
from oppu.store.objects import canonical_json, list_files, sha256_hex, write_atomic

DEFAULT_PUBLISH_LEASE_S = 900.0

logger = logging.getLogger(__name__)


def adapter_files(key: AdapterKey, adapter_dir: Path) -> list[tuple[str, Path]]:
    """``(name, local file)`` of every file of ``adapter_dir`` a publish uploads, sorted; a name the
    store cannot hold is an ``AdapterError``."""
    local_files = []
    for local_file in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        name = local_file.relative_to(adapter_dir).as_posix()
        if name in (MANIFEST_NAME, LEASE_NAME):
            continue
        if not is_safe_file_name(name):
            raise AdapterError(f"{adapter_dir}: cannot publish file {name!r} of adapter {key}: "
                               f"names must match {FILE_NAME_PATTERN.pattern}")
        local_files.append((name, local_file))
    return local_files


def upload_leased(fs: AbstractFileSystem, version_path: str, key: AdapterKey, adapter_dir: Path,
                  local_files: list[tuple[str, Path]], lease_s: float) -> dict[str, str]:
    """Upload ``local_files`` into the new folder ``version_path`` under a lease of ``lease_s``
    (renewed after any file that took over a quarter of it); returns each file's sha256.

    ``AdapterError`` where a weights file is not finite, or where a fresh listing afterwards lacks
    an uploaded file or the lease (nothing may then write the manifest). The lease stays until
    ``release_lease``.
    """
    version = version_path.rsplit("/", 1)[1]
    lease_path = f"{version_path}/{LEASE_NAME}"
    renewed_at = renew_lease(fs, lease_path, lease_s)
    file_hashes: dict[str, str] = {}
    for name, local_file in local_files:
        # Hash the very bytes uploaded, so a file changing under us cannot desync the two.
        data = local_file.read_bytes()
        if name.endswith(".safetensors"):
            refuse_nonfinite(key, adapter_dir, name, data)
        file_hashes[name] = sha256_hex(data)
        fs.pipe_file(f"{version_path}/{name}", data)
        if now_s() - renewed_at > lease_s / 4:
            renewed_at = renew_lease(fs, lease_path, lease_s)
    present = {path[len(version_path) + 1:] for path in list_files(fs, version_path)}
    vanished = sorted(set(file_hashes) - present)
    if vanished or LEASE_NAME not in present:
        raise AdapterError(
            f"adapter {key} version {version}: {vanished or [LEASE_NAME]} vanished while it was being "
            f"published (a gc_incomplete ran over the folder: is the publish lease of "
            f"{lease_s:.0f}s shorter than the upload?); no manifest was written, "
            f"publish again")
    return file_hashes


def renew_lease(fs: AbstractFileSystem, lease_path: str, lease_s: float) -> float:
    """(Re)write the lease of a folder being published; returns when (``now_s``)."""
    now = now_s()
    expires = datetime.fromtimestamp(now + lease_s, UTC).isoformat()
    write_atomic(fs, lease_path, canonical_json({"expires": expires}))
    return now


def release_lease(fs: AbstractFileSystem, version_path: str) -> None:
    """Delete the lease of a published folder (gone already: nothing to do)."""
    try:
        fs.rm_file(f"{version_path}/{LEASE_NAME}")
    except FileNotFoundError:
        pass


def lease_live(fs: AbstractFileSystem, version_dir: str) -> bool:
    """Whether the publish lease in ``version_dir`` has not expired (unreadable: expired)."""
    try:
        expires = datetime.fromisoformat(json.loads(fs.cat_file(f"{version_dir}/{LEASE_NAME}"))["expires"])
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable publish lease %s/%s: %s", version_dir, LEASE_NAME, exc)
        return False
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return expires > datetime.now(UTC)


def collect_incomplete(fs: AbstractFileSystem, root: str, older_than_s: float) -> int:
    """Remove the version folders under the store ``root`` without a manifest that a publisher can
    no longer be writing (``AdapterStore.gc_incomplete``); returns how many were removed."""
    now = datetime.now(UTC)
    fs.invalidate_cache(root)
    # withdirs: a writer may have died after creating its folder but before any upload.
    paths = fs.find(root, withdirs=True)
    version_files: dict[str, set[str]] = {}
    for path in paths:
        relative = path[len(root) + 1:].split("/")
        if len(relative) < 5 or not VERSION_PATTERN.fullmatch(relative[4]):
            continue
        version_dir = "/".join([root, *relative[:5]])
        names = version_files.setdefault(version_dir, set())
        if len(relative) > 5:
            names.add("/".join(relative[5:]))
    removed = 0
    for version_dir, names in sorted(version_files.items()):
        age_s = (now - version_time(version_dir.rsplit("/", 1)[1])).total_seconds()
        if MANIFEST_NAME in names or age_s <= older_than_s:
            continue
        if LEASE_NAME in names and lease_live(fs, version_dir):
            continue
        fresh = {path[len(version_dir) + 1:] for path in list_files(fs, version_dir)}
        if MANIFEST_NAME in fresh or (LEASE_NAME in fresh and lease_live(fs, version_dir)):
            continue
        fs.rm(version_dir, recursive=True)
        removed += 1
    return removed


def now_s() -> float:
    return datetime.now(UTC).timestamp()


def refuse_nonfinite(key: AdapterKey, adapter_dir: Path, name: str, data: bytes) -> None:
    """``AdapterError`` if a weights file holds NaN or inf: a diverged adapter is never published."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception:  # safetensors' own error types: the format is serving's to judge (decode_adapter)
        return
    # (the store sits below models in the house plan, so it does not borrow models' helper for this)
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise AdapterError(f"cannot publish adapter {key} of user {key.user!r}: {adapter_dir}/{name} holds NaN or "
                           f"infinite values in {len(bad)} tensor(s), first {bad[0]!r} (training diverged?)")
