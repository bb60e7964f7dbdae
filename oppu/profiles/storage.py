"""Profiles stored beside the prepared data: ``<data>/profiles-<writer>.parquet``.

One row per user (``user_id``, ``writer``, ``text``, ``created``). Profiles are written once
and reused: ``ensure_profiles`` only asks the writer for users the file does not have yet.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from oppu import fsutil
from oppu.data.records import UserData
from oppu.errors import DataError
from oppu.ids import validate_user_id
from oppu.profiles.writers import ProfileWriter
from oppu.tasks.base import Task

COLUMNS = ("user_id", "writer", "text", "created")

_log = logging.getLogger(__name__)


def profiles_uri(data_uri: str, writer: str) -> str:
    return fsutil.join(data_uri, f"profiles-{writer}.parquet")


def read_profiles(data_uri: str, writer: str) -> dict[str, str]:
    """``{user_id: text}`` of the stored profiles of ``writer``; empty when none were written."""
    import pyarrow.parquet as pq

    uri = profiles_uri(data_uri, writer)
    if not fsutil.exists(uri):
        return {}
    fs, path = fsutil.filesystem(uri)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"profiles file lacks column(s) {missing}", file=uri)
    rows = table.select(["user_id", "text"]).to_pylist()
    return {str(row["user_id"]): str(row["text"]) for row in rows}


def write_profiles(data_uri: str, writer: str, profiles: dict[str, str]) -> str:
    """Write (replace) the profiles file of ``writer``; returns its URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    created = datetime.now(UTC).isoformat(timespec="seconds")
    user_ids = sorted(validate_user_id(u) for u in profiles)
    table = pa.table({"user_id": user_ids, "writer": [writer] * len(user_ids),
                      "text": [profiles[u] for u in user_ids], "created": [created] * len(user_ids)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = profiles_uri(data_uri, writer)
    fs, path = fsutil.filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return uri


def ensure_profiles(data_uri: str, writer: ProfileWriter, task: Task, users: Sequence[UserData],
                    log=None) -> dict[str, str]:
    """Every user's profile by ``writer``: stored ones reused, missing ones written and stored
    (``log``: a callable for the one progress line; default this module's logger)."""
    stored = read_profiles(data_uri, writer.name)
    missing = [u for u in users if u.user_id not in stored]
    if missing:
        (log or _log.info)(f"[profiles] writing {len(missing)} {writer.name} profiles "
                           f"({len(stored)} already in {profiles_uri(data_uri, writer.name)})")
        stored.update(_write_off_driver(writer, task, missing))
        write_profiles(data_uri, writer.name, stored)
    return {u.user_id: stored[u.user_id] for u in users}


def _write_off_driver(writer: ProfileWriter, task: Task, users: Sequence[UserData]) -> dict[str, str]:
    """Profiles from ``writer``; a model-loading writer runs as a Ray task (on a GPU where it asks
    for one), so the driver never holds an LLM."""
    from oppu.profiles.writers import HFProfileWriter

    if not isinstance(writer, HFProfileWriter):
        return writer.write(task, users)
    import ray

    remote = ray.remote(_write_profiles_task).options(num_gpus=writer.num_gpus or None)
    return ray.get(remote.remote(writer, task, list(users)))


def _write_profiles_task(writer: ProfileWriter, task: Task, users: list[UserData]) -> dict[str, str]:
    return writer.write(task, users)


def writer_for_run(cfg) -> ProfileWriter:
    """The writer a run's ``profiles`` section names (``cfg`` is a ``RunConfig``)."""
    import os

    from oppu.profiles.writers import make_writer

    settings = cfg.profiles
    return make_writer(settings.writer, model=settings.model, base_url=settings.base_url,
                       api_key=os.environ.get(settings.api_key_env), items_per_user=settings.items_per_user,
                       batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                       num_gpus=settings.num_gpus, seed=cfg.seed)


def run_profiles(cfg, users: Sequence[UserData], log=None) -> dict[str, str]:
    """Every user's profile for the run ``cfg``: read from the data dir, the missing ones written."""
    from oppu.tasks import get_task

    return ensure_profiles(cfg.data_uri, writer_for_run(cfg), get_task(cfg.task), users, log)


def stored_profiles(cfg, user_ids: Sequence[str]) -> dict[str, str]:
    """The stored profiles of ``user_ids`` for ``cfg``'s writer; a missing one is a ``DataError``."""
    stored = read_profiles(cfg.data_uri, cfg.profiles.writer)
    missing = [u for u in user_ids if u not in stored]
    if missing:
        raise DataError(f"no {cfg.profiles.writer} profile for {len(missing)} user(s), e.g. "
                        f"{missing[0]!r}: run `oppu profiles --run {cfg.run_dir} --writer "
                        f"{cfg.profiles.writer}` first", file=profiles_uri(cfg.data_uri, cfg.profiles.writer))
    return {u: stored[u] for u in user_ids}
