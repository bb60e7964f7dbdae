"""A key's versions as the store lists them, and the rollback record that says which is current
(issue #17).

The *current* version of a key is its newest usable one, unless a rollback said otherwise:
``AdapterStore.rollback(key, version)`` writes ``ROLLBACK_NAME`` in the key's folder (atomically,
like a manifest), naming the version made current and the newest version at that moment; versions
after the first and up to the second are passed over by ``latest`` and ``read_files`` from then
on. A version published later is newer than both, so it is current again; and a broken current
version falls back to older ones, never to the versions rolled back from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from fsspec import AbstractFileSystem

from oppu.store.manifest import MANIFEST_NAME, ROLLBACK_NAME, VERSION_PATTERN
from oppu.store.objects import canonical_json, list_files, write_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolledBack:
    """A key's rollback: ``version`` is current, the versions after it through ``through`` are not."""

    version: str
    through: str

    def passes_over(self, version: str) -> bool:
        return self.version < version <= self.through


def complete_versions(fs: AbstractFileSystem, path: str, depth: int) -> list[tuple[str, str]]:
    """``(user, version)`` of each manifest ``depth`` folders below ``path`` (user "" at depth 1)."""
    found = []
    for file_path in list_files(fs, path):
        parts = file_path[len(path) + 1:].split("/")
        if len(parts) == depth + 1 and parts[-1] == MANIFEST_NAME and VERSION_PATTERN.fullmatch(parts[-2]):
            found.append(("/".join(parts[:-2]), parts[-2]))
    return found


def key_listing(fs: AbstractFileSystem, key_path: str) -> tuple[dict[str, set[str]], RolledBack | None]:
    """One fresh listing of a key's folder: the file names of each version folder, and the key's
    rollback record (read only where the listing shows one)."""
    listing: dict[str, set[str]] = {}
    has_rollback = False
    for file_path in list_files(fs, key_path):
        parts = file_path[len(key_path) + 1:].split("/", 1)
        if len(parts) == 2 and VERSION_PATTERN.fullmatch(parts[0]):
            listing.setdefault(parts[0], set()).add(parts[1])
        has_rollback = has_rollback or parts == [ROLLBACK_NAME]
    return listing, read_rollback(fs, key_path) if has_rollback else None


def complete_in(listing: dict[str, set[str]]) -> list[str]:
    """The versions of ``key_listing``'s listing that have a manifest, newest first."""
    return sorted((v for v, names in listing.items() if MANIFEST_NAME in names), reverse=True)


def write_rollback(fs: AbstractFileSystem, key_path: str, version: str, newest: str) -> None:
    """Record, in one atomic write, that ``version`` is current and those after it through
    ``newest`` are passed over."""
    record = {"version": version, "passes_over_through": newest, "at": datetime.now(UTC).isoformat()}
    write_atomic(fs, f"{key_path}/{ROLLBACK_NAME}", canonical_json(record))


def read_rollback(fs: AbstractFileSystem, key_path: str) -> RolledBack | None:
    """What a key's ``ROLLBACK_NAME`` says (None without one; an unreadable one is ignored with a
    warning, so the newest version is current)."""
    path = f"{key_path}/{ROLLBACK_NAME}"
    try:
        raw = json.loads(fs.cat_file(path))
        rolled_back = RolledBack(raw["version"], raw["passes_over_through"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable rollback record %s: %s", path, exc)
        return None
    if not (VERSION_PATTERN.fullmatch(str(rolled_back.version))
            and VERSION_PATTERN.fullmatch(str(rolled_back.through))):
        logger.warning("ignoring the rollback record %s: it names no version ids", path)
        return None
    return rolled_back
