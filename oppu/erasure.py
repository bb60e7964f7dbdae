"""Erasing a user: every trace of them in a run directory and an adapter store, and a tombstone.

    oppu users delete --run DIR --user U      # erase; exit 1 if any file still mentions U
    oppu users restore --run DIR --user U     # lift the tombstone (the user may be trained again)

What goes (``erase_user``):

- every adapter version of every task, base and variant of the user (``AdapterStore.delete_user``);
- the user's API tokens (``TokenStore.revoke``);
- the user's records in every data file of the run directory: rows of Parquet files (the
  prepared ``users.parquet``, the profiles), entries of JSON and YAML files (the raw LaMP files,
  predictions, reports, metrics), found by the user id and by the ids of their queries and
  history items, and every other mention of the user id in those files' strings, redacted.

Model folders (``base*``, ``pretrained``, Ray Train's ``ray-train``) hold weights, not records: a
test user's data never reaches them (bases are adapted on the other users). Erasing a *base*
user's influence on a base means adapting the base again without them; the report says so.

Then the whole run directory and store are scanned, bytes and decoded Parquet alike, for the
user id; a file that still mentions it is listed in the report (``remaining``), and the command
fails. A versioned S3 bucket keeps noncurrent copies of every rewritten or deleted object:
docs/erasure.md says how to purge them.

The tombstone: a file named by a salted hash of the user id under ``{store}/_tombstones/`` (the
id itself is written nowhere). ``oppu train-users`` skips tombstoned users, the publisher refuses
to publish them and removes a version that raced the delete, and the serve app answers 404 for
them. ``oppu users restore`` removes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from oppu import fsutil
from oppu.errors import OppuError
from oppu.ids import validate_user_id

logger = logging.getLogger(__name__)

TOMBSTONES = "_tombstones"
SALT_FILE = "salt"
MODEL_DIRS = ("base", "pretrained", "ray-train")  # prefixes of run-dir folders holding weights only
ID_FIELDS = ("user_id", "user", "id", "query_id", "uid")  # fields that name a record's owner or query
SCAN_LIMIT_BYTES = 256 << 20  # larger files are model weights; listed as not scanned
REDACTED = "[erased]"


@dataclass
class ErasureReport:
    """What ``erase_user`` did and what it found afterwards."""

    adapter_versions: int = 0
    tokens_revoked: int = 0
    records_removed: dict[str, int] = field(default_factory=dict)  # file -> records (rows/entries) removed
    redacted: dict[str, int] = field(default_factory=dict)  # file -> strings with the id redacted
    remaining: list[str] = field(default_factory=list)  # files that still mention the user
    not_scanned: list[str] = field(default_factory=list)  # files over SCAN_LIMIT_BYTES
    was_base_user: bool = False

    @property
    def complete(self) -> bool:
        return not self.remaining


# -- tombstones ---------------------------------------------------------------------------------


def _tombstone_dir(store_uri: str) -> str:
    return fsutil.join(store_uri, TOMBSTONES)


def _salt(store_uri: str, create: bool) -> str | None:
    """The store's tombstone salt: random, made once, so a tombstone's name does not reveal the id
    to anyone who can hash candidate ids without reading the store."""
    path = fsutil.join(_tombstone_dir(store_uri), SALT_FILE)
    if fsutil.exists(path):
        return fsutil.read_text(path).strip()
    if not create:
        return None
    fsutil.write_text(path, secrets.token_hex(16))
    return fsutil.read_text(path).strip()


def _tombstone_uri(store_uri: str, user: str, salt: str) -> str:
    digest = hashlib.sha256(f"{salt}:{user}".encode()).hexdigest()
    return fsutil.join(_tombstone_dir(store_uri), digest)


def add_tombstone(store_uri: str, user: str) -> None:
    user = validate_user_id(user)
    fsutil.write_text(_tombstone_uri(store_uri, user, _salt(store_uri, create=True)), "erased\n")


def remove_tombstone(store_uri: str, user: str) -> bool:
    """Lift ``user``'s tombstone; False when there was none."""
    user = validate_user_id(user)
    salt = _salt(store_uri, create=False)
    if salt is None:
        return False
    uri = _tombstone_uri(store_uri, user, salt)
    if not fsutil.exists(uri):
        return False
    fs, path = fsutil.filesystem(uri)
    fs.rm(path)
    return True


def is_tombstoned(store_uri: str, user: str) -> bool:
    salt = _salt(store_uri, create=False)
    return salt is not None and fsutil.exists(_tombstone_uri(store_uri, validate_user_id(user), salt))


def tombstoned(store_uri: str, users: Iterable[str]) -> set[str]:
    """Those of ``users`` that were erased."""
    erased = tombstone_check(store_uri)
    return {u for u in users if erased(u)}


def tombstone_check(store_uri: str):
    """A picklable ``user -> erased?`` for filtering many users (one listing of the tombstones)."""
    salt = _salt(store_uri, create=False)
    if salt is None:
        return _NoneErased()
    fs, path = fsutil.filesystem(_tombstone_dir(store_uri))
    fs.invalidate_cache(path)  # a long-lived filesystem (the serve app's) must see new tombstones
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:  # every tombstone lifted (object stores keep no empty folder)
        entries = []
    return _Erased(salt, frozenset(entry.rsplit("/", 1)[-1] for entry in entries))


@dataclass(frozen=True)
class _Erased:
    salt: str
    names: frozenset[str]

    def __call__(self, user: str) -> bool:
        return hashlib.sha256(f"{self.salt}:{user}".encode()).hexdigest() in self.names


class _NoneErased:
    def __call__(self, user: str) -> bool:
        return False


# -- erasing ------------------------------------------------------------------------------------


def erase_user(run_dir: str, user: str, store_uri: str | None = None, token_uri: str | None = None,
               data_uri: str | None = None) -> ErasureReport:
    """Erase ``user`` from ``run_dir`` (and its store, tokens and data where they live elsewhere).

    The tombstone goes first, so a training job or publish running meanwhile stops adding back;
    then the adapters and tokens; then the records. Returns the report; ``report.remaining`` names
    files that still mention the user (the caller fails on them).
    """
    user = validate_user_id(user)
    store_uri = store_uri or fsutil.join(run_dir, "adapters")
    token_uri = token_uri or store_uri
    data_uri = data_uri or fsutil.join(run_dir, "data")
    report = ErasureReport()
    owned = _owned_ids(data_uri, user, report)
    add_tombstone(store_uri, user)
    from oppu.store.adapters import AdapterStore
    from oppu.store.tokens import TokenStore

    report.adapter_versions = AdapterStore(store_uri).delete_user(user) if fsutil.exists(store_uri) else 0
    report.tokens_revoked = TokenStore(token_uri).revoke(user) if fsutil.exists(token_uri) else 0
    mention = mention_pattern(user)
    roots = dict.fromkeys([run_dir, data_uri])  # the data may live outside the run dir
    for root in roots:
        for uri in _record_files(root, skip=[store_uri]):
            _erase_records(uri, user, owned, mention, report)
    if any(uri.startswith(data_uri) and uri.endswith("users.parquet") for uri in report.records_removed):
        from oppu.data.dataset import recount

        recount(data_uri)  # dataset.json's user counts must match the table, or reading it fails
    for root in dict.fromkeys([run_dir, data_uri, store_uri, token_uri]):
        report.remaining += [uri for uri in scan(root, mention, report) if uri not in report.remaining]
    return report


def mention_pattern(user: str) -> re.Pattern[bytes]:
    """The user id as a whole word: not inside a longer id (``user1`` in ``user10``), but inside a
    query id built from it (``user1-q0``)."""
    return re.compile(rb"(?<![A-Za-z0-9])" + re.escape(user.encode()) + rb"(?![A-Za-z0-9])")


def _owned_ids(data_uri: str, user: str, report: ErasureReport) -> set[str]:
    """The ids of the user's queries and history items, read from the prepared data before it goes."""
    import pyarrow.parquet as pq

    path = fsutil.join(data_uri, "users.parquet")
    if not fsutil.exists(path):
        return set()
    fs, local = fsutil.filesystem(path)
    with fs.open(local, "rb") as handle:
        table = pq.read_table(handle, columns=["user_id", "role", "history", "queries"])
    ids: set[str] = set()
    for row in table.filter(_equals(table, "user_id", user)).to_pylist():
        report.was_base_user = report.was_base_user or row["role"] == "base"
        for column in ("history", "queries"):
            for item in json.loads(row[column] or "[]"):
                if isinstance(item, dict) and item.get("id") not in (None, ""):
                    ids.add(str(item["id"]))
    return ids


def _equals(table, column: str, value: str):
    import pyarrow.compute as pc

    return pc.equal(table.column(column).cast("string"), value)


def _record_files(root: str, skip: list[str]) -> list[str]:
    """Data files under ``root`` (Parquet, JSON, YAML), outside model folders and the store."""
    if not fsutil.exists(root):
        return []
    fs, base = fsutil.filesystem(root)
    skipped = [fsutil.filesystem(s)[1].rstrip("/") + "/" for s in skip]
    found = []
    for path in sorted(fs.find(base)):
        relative = path[len(base.rstrip("/")) + 1:]
        if any(path.startswith(s) for s in skipped) or relative.split("/")[0].startswith(MODEL_DIRS):
            continue
        if path.endswith((".parquet", ".json", ".yaml", ".yml", ".jsonl")):
            found.append(_uri(root, base, path))
    return found


def _uri(root: str, base: str, path: str) -> str:
    return fsutil.join(root, path[len(base.rstrip("/")) + 1:])


def _erase_records(uri: str, user: str, owned: set[str], mention: re.Pattern[bytes],
                   report: ErasureReport) -> None:
    fs, path = fsutil.filesystem(uri)
    with fs.open(path, "rb") as handle:
        data = handle.read()
    if uri.endswith(".parquet"):
        rewritten, removed, redacted = _erase_parquet(data, user, owned)
    elif uri.endswith(".jsonl"):
        rewritten, removed, redacted = _erase_json_lines(data, user, owned, mention)
    else:
        rewritten, removed, redacted = _erase_structured(uri, data, user, owned, mention)
    if rewritten is None:
        return
    with fs.open(path, "wb") as handle:
        handle.write(rewritten)
    if removed:
        report.records_removed[uri] = removed
    if redacted:
        report.redacted[uri] = redacted


def _erase_parquet(data: bytes, user: str, owned: set[str]) -> tuple[bytes | None, int, int]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    keep = None
    for column in ID_FIELDS:
        if column in table.column_names:
            values = table.column(column).cast("string")
            owner = pc.or_(pc.equal(values, user), pc.is_in(values, pa.array(sorted(owned), pa.string())))
            drop = pc.fill_null(owner, False)
            keep = pc.invert(drop) if keep is None else pc.and_(keep, pc.invert(drop))
    if keep is None or pc.all(keep).as_py():
        return None, 0, 0
    kept = table.filter(keep)
    sink = io.BytesIO()
    pq.write_table(kept, sink)
    return sink.getvalue(), table.num_rows - kept.num_rows, 0


def _erase_json_lines(data: bytes, user: str, owned: set[str], mention) -> tuple[bytes | None, int, int]:
    lines, removed, redacted = [], 0, 0
    for line in data.decode().splitlines():
        if not line.strip():
            continue
        value, gone, changed = _prune(json.loads(line), user, owned, mention)
        if gone:
            removed += 1
            continue
        redacted += changed
        lines.append(json.dumps(value))
    if not removed and not redacted:
        return None, 0, 0
    return ("\n".join(lines) + ("\n" if lines else "")).encode(), removed, redacted


def _erase_structured(uri: str, data: bytes, user: str, owned: set[str],
                      mention) -> tuple[bytes | None, int, int]:
    import yaml

    is_yaml = uri.endswith((".yaml", ".yml"))
    try:
        value = yaml.safe_load(data) if is_yaml else json.loads(data)
    except (ValueError, yaml.YAMLError) as exc:
        if mention.search(data):  # a file we cannot read and that mentions the user: loud
            raise OppuError(f"cannot erase from {uri}: not valid {'YAML' if is_yaml else 'JSON'} ({exc})") from exc
        return None, 0, 0
    counts = _Counts()
    pruned = _prune_value(value, user, owned, mention, counts)
    if not counts.removed and not counts.redacted:
        return None, 0, 0
    text = yaml.safe_dump(pruned, sort_keys=False) if is_yaml else json.dumps(pruned, indent=1)
    return text.encode(), counts.removed, counts.redacted


@dataclass
class _Counts:
    removed: int = 0
    redacted: int = 0


def _prune(value: Any, user: str, owned: set[str], mention) -> tuple[Any, bool, int]:
    """(pruned value, whether the value itself is the user's record, strings redacted)."""
    if _owns(value, user, owned):
        return None, True, 0
    counts = _Counts()
    return _prune_value(value, user, owned, mention, counts), False, counts.redacted


def _owns(value: Any, user: str, owned: set[str]) -> bool:
    if isinstance(value, str):
        return value == user or value in owned
    if isinstance(value, dict):
        return any(isinstance(value.get(k), str | int) and str(value[k]) in ({user} | owned) for k in ID_FIELDS)
    return False


def _prune_value(value: Any, user: str, owned: set[str], mention, counts: _Counts) -> Any:
    """Drop the user's records from ``value`` (entries keyed by their ids, list items that are
    their records) and redact the user id from what is left."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if str(key) == user or str(key) in owned or (key not in ID_FIELDS and _owns(item, user, owned)
                                                         and isinstance(item, dict)):
                counts.removed += 1
                continue
            out[key] = _prune_value(item, user, owned, mention, counts)
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            if _owns(item, user, owned):
                counts.removed += 1
                continue
            out.append(_prune_value(item, user, owned, mention, counts))
        return out
    if isinstance(value, str) and mention.search(value.encode()):
        counts.redacted += 1
        return mention.sub(REDACTED.encode(), value.encode()).decode()
    return value


def scan(root: str, mention: re.Pattern[bytes], report: ErasureReport | None = None) -> list[str]:
    """Files under ``root`` whose bytes, or whose Parquet cells once decoded, mention the user."""
    if not fsutil.exists(root):
        return []
    fs, base = fsutil.filesystem(root)
    found = []
    for path in sorted(fs.find(base)):
        if fs.size(path) > SCAN_LIMIT_BYTES:
            if report is not None:
                report.not_scanned.append(_uri(root, base, path))
            continue
        with fs.open(path, "rb") as handle:
            data = handle.read()
        if mention.search(data) or (path.endswith(".parquet") and _parquet_mentions(data, mention)):
            found.append(_uri(root, base, path))
    return found


def _parquet_mentions(data: bytes, mention: re.Pattern[bytes]) -> bool:
    """Parquet compresses its pages, so the raw bytes can hide an id: decode and look again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError):
        return False
    return any(mention.search(str(v).encode()) for column in table.columns for v in column.to_pylist())
