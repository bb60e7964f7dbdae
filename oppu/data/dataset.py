"""The prepared data set: ``users.parquet`` (one row per user) and ``dataset.json`` beside it.

The directory is a local path or any fsspec URI (``file:///...``, ``s3://bucket/prefix``), so a
job on a cluster reads the same data set ``oppu prepare`` wrote on a laptop. ``dataset.json`` is
written after ``users.parquet``: a directory without it is not a data set.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oppu import fsutil
from oppu.data.records import HistoryItem, UserData
from oppu.errors import ConfigError, DataError
from oppu.ids import validate_user_id

if TYPE_CHECKING:
    from oppu.tasks import Task

USERS_FILE = "users.parquet"
META_FILE = "dataset.json"
FORMAT_VERSION = 1
USER_COLUMNS = ("user_id", "role", "n_history", "n_queries", "history", "queries")


@dataclass
class PreparedDataset:
    """A data set as ``read_dataset`` returns it: the task, every user, and ``dataset.json``."""

    task: Task
    users: list[UserData]
    meta: dict[str, Any]
    location: str  # the directory or URI it was read from
    _by_id: dict[str, UserData] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {user.user_id: user for user in self.users}

    def test_users(self) -> list[UserData]:
        return [user for user in self.users if user.role == "test"]

    def base_users(self) -> list[UserData]:
        return [user for user in self.users if user.role == "base"]

    def user(self, user_id: str) -> UserData:
        try:
            return self._by_id[user_id]
        except KeyError:
            raise KeyError(f"user {user_id!r} is not in the data set at {self.location}") from None


def users_parquet_path(directory: str | Path) -> str:
    """Where the users table of the data set in ``directory`` (path or URI) lives."""
    return fsutil.join(str(directory), USERS_FILE)


def dataset_json_path(directory: str | Path) -> str:
    return fsutil.join(str(directory), META_FILE)


def assign_roles(users: list[UserData], n_test: int) -> list[UserData]:
    """Mark the ``n_test`` users with the longest history ``test`` and every other user ``base``.

    Ties in history length go to the smaller user id (string order), so the choice depends only
    on the data. Returns new records in the input order.
    """
    if n_test < 0:
        raise ConfigError(f"n_test: must be >= 0, got {n_test}")
    if n_test >= len(users):
        raise ConfigError(
            f"n_test: {n_test} test users asked for but the data has only {len(users)} users; "
            "base task adaptation needs at least one non-test user, so use n_test < "
            f"{len(users)}")
    ranked = sorted(users, key=lambda user: (-len(user.history), user.user_id))
    test_ids = {user.user_id for user in ranked[:n_test]}
    return [replace(user, role="test" if user.user_id in test_ids else "base") for user in users]


def dataset_fingerprint(user: UserData) -> str:
    """sha256 (hex) of the user's history: ids, fields and dates, in order.

    An adapter trained on a history with the same fingerprint need not be trained again.
    """
    canonical = json.dumps([asdict(item) for item in user.history], sort_keys=True,
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def history_span(user: UserData) -> dict[str, Any]:
    """What part of the user's behaviour an adapter saw, for its manifest.

    Dates are ``None`` where the task's items carry none; the item ids then mark the span.
    """
    history = user.history
    return {
        "n_items": len(history),
        "first_item_id": history[0].id if history else None,
        "last_item_id": history[-1].id if history else None,
        "first_date": history[0].date if history else None,
        "last_date": history[-1].date if history else None,
    }


def write_dataset(out_dir: str | Path, task_name: str, users: list[UserData],
                  meta: dict[str, Any]) -> Path | str:
    """Write ``users.parquet`` then ``dataset.json`` into ``out_dir`` (a path or fsspec URI).

    ``meta`` adds keys to ``dataset.json`` (e.g. ``sources``, ``n_test``); the counts, the task
    name and the creation time are computed here and take precedence. Returns ``out_dir`` as a
    ``Path`` when it is local, else the URI as given.
    """

    from oppu.tasks import get_task

    task = get_task(task_name)
    seen: set[str] = set()
    for user in users:
        validate_user_id(user.user_id)
        if user.user_id in seen:
            raise DataError("duplicate user in the data set", user=user.user_id)
        if user.role not in ("test", "base"):
            raise DataError(f"role must be 'test' or 'base', got {user.role!r}",
                            user=user.user_id, field="role")
        seen.add(user.user_id)

    record = {
        "sources": {},
        **meta,
        "task": task.name,
        **_counts(users),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "format_version": FORMAT_VERSION,
    }

    buffer = _users_parquet(users)
    fs, root = fsutil.filesystem(str(out_dir))
    fs.makedirs(root, exist_ok=True)
    if fs.exists(fsutil.join(root, META_FILE)):  # readers must never pair old metadata with new rows
        fs.rm(fsutil.join(root, META_FILE))
    with fs.open(fsutil.join(root, USERS_FILE), "wb") as handle:
        handle.write(buffer.getvalue())
    fsutil.write_json(dataset_json_path(out_dir), record)
    return str(out_dir) if fsutil.is_remote(str(out_dir)) else fsutil.local_path(str(out_dir))


def _counts(users: list[UserData]) -> dict[str, int]:
    """The counts ``dataset.json`` keeps."""
    return {"n_users": len(users), "n_test_users": sum(user.role == "test" for user in users),
            "n_history_items": sum(len(user.history) for user in users),
            "n_queries": sum(len(user.queries) for user in users)}


def _users_parquet(users: list[UserData]) -> io.BytesIO:
    """``users.parquet``'s bytes for ``users``: one row each, the schema every task shares."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("user_id", pa.string()), ("role", pa.string()), ("n_history", pa.int64()),
                        ("n_queries", pa.int64()), ("history", pa.large_string()),
                        ("queries", pa.large_string())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([user.to_row() for user in users], schema=schema), buffer)
    return buffer


@dataclass(frozen=True)
class HistoryUpdate:
    """What ``add_history`` did to one user."""

    user: UserData  # the user's row as written
    created: bool  # a new user (role "test"), not one the data set had
    added: int  # items appended
    already_there: int  # items the user's history already held (same id and content)


def add_history(directory: str | Path, user_id: str, items: list[HistoryItem], *,
                source: str = "<history>") -> HistoryUpdate:
    """Add ``items`` to the user's history in the data set at ``directory``; a new user joins as a
    ``test`` user (so ``train_users`` gives them an adapter).

    Items already in the user's history (same id) are skipped when their content is the same and
    refused (``DataError`` naming ``source``, the item and the user) when it differs; the others
    are appended after the known history (they are the newest: every query's ``visible_history``
    keeps pointing at the items it saw). ``users.parquet`` is replaced whole (a temp file renamed
    into place; on S3 one new object), then ``dataset.json``'s counts. Writers are not locked
    against each other: one writer a data set at a time.
    """
    user_id = validate_user_id(user_id)
    if not items:
        raise DataError("no history items to add", file=source, user=user_id)
    meta_path, users_path = dataset_json_path(directory), users_parquet_path(directory)
    meta = _read_meta(meta_path)
    users = read_users(users_path)
    index = next((i for i, user in enumerate(users) if user.user_id == user_id), None)
    current = users[index] if index is not None else UserData(user_id=user_id, role="test")
    known = {item.id: item for item in current.history}
    new, already = [], 0
    for item in items:
        if item.id not in known:
            known[item.id] = item
            new.append(item)
        elif known[item.id] == item:
            already += 1
        else:
            raise DataError("the user's history already has an item with this id and other content "
                            "(give the new item another id)", file=source, record=item.id,
                            field="id", user=user_id)
    updated = replace(current, history=[*current.history, *new])
    if index is None:
        users.append(updated)
    else:
        users[index] = updated
    if new:
        fsutil.write_bytes(users_path, _users_parquet(users).getvalue())
        fsutil.write_json(meta_path, {**meta, **_counts(users),
                                      "updated": datetime.now(UTC).isoformat(timespec="seconds")})
    return HistoryUpdate(user=updated, created=index is None, added=len(new), already_there=already)


def recount(directory: str | Path) -> None:
    """Set ``dataset.json``'s counts to what ``users.parquet`` holds (after users were removed)."""
    meta_path = dataset_json_path(directory)
    users = read_users(users_parquet_path(directory))
    fsutil.write_json(meta_path, {**_read_meta(meta_path), **_counts(users),
                                  "updated": datetime.now(UTC).isoformat(timespec="seconds")})


def read_users_table(users_path: str):
    """``users.parquet`` at ``users_path`` as one Arrow table, its columns checked."""
    import pyarrow.parquet as pq

    if not fsutil.exists(users_path):
        raise DataError("users.parquet is missing", file=users_path)
    fs, path = fsutil.filesystem(users_path)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(io.BytesIO(handle.read()))
    missing = [name for name in USER_COLUMNS if name not in table.column_names]
    if missing:
        raise DataError(f"users.parquet lacks columns {missing}", file=users_path)
    return table


def read_users(users_path: str, only: str | None = None) -> list[UserData]:
    """Every user row of ``users.parquet`` at ``users_path`` (only the user ``only``, if given)."""
    import pyarrow.compute as pc

    table = read_users_table(users_path)
    if only is not None:
        table = table.filter(pc.equal(table["user_id"], only))
    users = []
    for row in table.to_pylist():
        try:
            users.append(UserData.from_row(row))
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(f"unreadable user row: {exc}", file=users_path,
                            user=str(row.get("user_id"))) from None
    return users


def read_dataset(directory: str | Path) -> PreparedDataset:
    """Read the data set ``write_dataset`` wrote in ``directory`` (a path or fsspec URI)."""
    from oppu.tasks import get_task

    meta_path, users_path = dataset_json_path(directory), users_parquet_path(directory)
    meta = _read_meta(meta_path)
    task = get_task(meta["task"])

    users = read_users(users_path)
    if meta.get("n_users") is not None and meta["n_users"] != len(users):
        raise DataError(f"dataset.json says {meta['n_users']} users but users.parquet holds "
                        f"{len(users)}", file=meta_path, field="n_users")
    return PreparedDataset(task=task, users=users, meta=meta, location=str(directory))


def _read_meta(meta_path: str) -> dict[str, Any]:
    if not fsutil.exists(meta_path):
        raise DataError("not a prepared data set: dataset.json is missing (run `oppu prepare`)",
                        file=meta_path)
    try:
        meta = fsutil.read_json(meta_path)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc}", file=meta_path) from None
    if not isinstance(meta, dict) or "task" not in meta:
        raise DataError("dataset.json must be an object with a 'task'", file=meta_path, field="task")
    return meta
