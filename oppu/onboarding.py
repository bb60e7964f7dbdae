"""A user's model over its life: onboard a user's history, then train just them.

``oppu users add`` and the serve app's ``PUT /v1/users/{user}/history`` add history items to the
prepared data set through ``add_user_history`` (items validated as ``oppu prepare`` validates a
profile item: ``oppu.data.lamp_io.read_history``); ``oppu users train`` trains the named users'
adapters for every variant through ``train_named_users``, which is the one train-and-publish path
(``oppu.training.users.train_personal_adapters`` with ``users.users`` set), so a new version lands
in the store and a serving replica picks it up within its ``adapter_check_ttl_s``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from oppu.data.dataset import HistoryUpdate
from oppu.errors import ConfigError, DataError, UserErasedError
from oppu.ids import validate_user_id
from oppu.run_config import RunConfig
from oppu.training.users_report import UserResult

log = logging.getLogger(__name__)


class HistoryErrors(DataError):
    """Every bad item of one history, each a ``DataError`` naming the file, item and field."""

    def __init__(self, errors: list[DataError]):
        self.errors = errors
        first = errors[0]
        super().__init__(f"{len(errors)} bad history item(s); the first: {first}")
        self.file, self.record, self.field, self.user = first.file, first.record, first.field, first.user


def refuse_erased(store_uri: str, user: str) -> None:
    """``UserErasedError`` when ``user`` has a tombstone in the store (``oppu users delete``)."""
    from oppu.erasure import is_tombstoned

    if is_tombstoned(store_uri, user):
        raise UserErasedError(f"user {user!r} was erased (oppu users delete) and may not be added or "
                              f"trained again until `oppu users restore --user {user}` lifts the "
                              f"tombstone in {store_uri}")


def add_user_history(data_uri: str, store_uri: str, user: str, history: str | Path | list, *,
                     file: str | None = None) -> HistoryUpdate:
    """Validate ``history`` (a file of LaMP profile items, or the parsed list) and add it to the
    user's row of the data set at ``data_uri``; a new user joins as a test user.

    Raises ``UserErasedError`` for an erased user, ``HistoryErrors`` listing every bad item, and
    ``DataError`` for an item id the user already has with other content.
    """
    from oppu.data.dataset import add_history, dataset_json_path
    from oppu.data.lamp_io import read_history
    from oppu.fsutil import read_json
    from oppu.tasks import get_task

    user = validate_user_id(user)
    refuse_erased(store_uri, user)
    meta_path = dataset_json_path(data_uri)
    try:
        task = get_task(read_json(meta_path)["task"])
    except FileNotFoundError:
        raise DataError("not a prepared data set: dataset.json is missing (run `oppu prepare`)",
                        file=meta_path) from None
    source = file or ("<request>" if isinstance(history, list) else str(history))
    items, errors = read_history(task, history, user=user, file=source, collect_errors=True)
    if errors:
        raise HistoryErrors(errors)
    return add_history(data_uri, user, items, source=source)


def train_named_users(cfg: RunConfig, users: list[str], log_line=log.info) -> dict[str, list[UserResult]]:
    """Train (or skip, when the store already has it for this data and config) the adapter of each
    of ``users`` for every variant in ``cfg.users.variants``; returns each variant's results.

    Every named user must be a test user of the data set and not erased (``ConfigError`` naming
    the user otherwise, before Ray starts); nobody else is trained.
    """
    from oppu.data.dataset import read_users, users_parquet_path
    from oppu.erasure import tombstoned
    from oppu.pipeline import init_ray
    from oppu.preflight import check_inputs
    from oppu.training.users import train_personal_adapters

    if not users:
        raise ConfigError("--user: name at least one user")
    users = list(dict.fromkeys(validate_user_id(user) for user in users))
    users_path = users_parquet_path(cfg.data_uri)
    roles = {row.user_id: row.role for row in read_users(users_path)}
    for user in users:
        if user not in roles:
            raise ConfigError(f"user {user!r} is not in the data set {users_path} (add them with "
                              "`oppu users add --history FILE`)")
        if roles[user] != "test":
            raise ConfigError(f"user {user!r} is a {roles[user]} user of {users_path}: only test users "
                              "get a personal adapter")
    for user in sorted(tombstoned(cfg.store_uri, users)):
        refuse_erased(cfg.store_uri, user)
    cfg = dataclasses.replace(cfg, users=dataclasses.replace(cfg.users, users=users))
    check_inputs(cfg, ["users"])
    init_ray(cfg)
    return {variant: train_personal_adapters(cfg, variant, log=log_line) for variant in cfg.users.variants}
