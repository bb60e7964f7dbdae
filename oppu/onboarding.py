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

from oppu.errors import ConfigError
from oppu.ids import validate_user_id
from oppu.run_config import RunConfig
from oppu.training.users_report import UserResult
from oppu.user_history import refuse_erased

log = logging.getLogger(__name__)


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
