"""A base upgrade (issue #17): every user's adapters retrained on new bases, then the run cut over.

Adapters are keyed by the fingerprint of the base they were trained on (``oppu.store``), so the
adapters of a new base sit beside the old ones and the serve app, whose ``model`` fixes the base
and so the fingerprint it reads under, never sees them. The upgrade, in three steps:

1. New bases are adapted into a folder of their own, ``RunConfig.bases`` pointed there
   (``oppu train-base --set bases=RUN/bases/v2``, with the new ``model``), while the run's
   config still names the old ones.
2. ``migrate_users`` trains, for every variant, each user with an adapter on the old base onto
   the new one: the train_users stage (``oppu.training.users.train_personal_adapters``, the one
   train-and-publish path) over those users with ``bases`` set to the new folder, its report
   ``reports/migrate_users-<variant>.json``. Serving goes on from the old adapters meanwhile.
   It is resumable: a user whose adapter on the new base was trained on their current history is
   migrated already and not trained again; a user that fails is reported and fails only itself.
3. Once ``migration_status`` says every variant is complete (each such user has a current
   adapter on the new base trained on their current history), ``cut_over`` records the new bases
   in the run's ``config.yaml`` (later training goes to them), and the serve app is redeployed
   with ``model`` the new base (docs/cluster.md, *Base upgrade*: a RayService spec change).

A user with an adapter on the old base but no history to train on (not a test user of the data
set, e.g. an imported adapter) cannot be migrated: the migration is incomplete until they are
dealt with (an adapter imported for the new base counts as migrated only with their history), or
until the cut-over is told to leave them behind (``allow_unmigratable``: named in the status, they
have no adapter on the new base, so serving answers them 404 until one is imported for it).
Erased users are left out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from oppu import fsutil
from oppu.errors import ConfigError
from oppu.run_config import RunConfig, read_run_config_file
from oppu.training.users_report import UserResult

log = logging.getLogger(__name__)

MIGRATE_STAGE = "migrate_users"  # the stage's name in logs and its report, reports/migrate_users-<variant>.json


@dataclass(frozen=True)
class VariantMigration:
    """Where one variant's move from the old base to the new one stands."""

    variant: str
    old_base: str
    old_fingerprint: str
    new_base: str
    new_fingerprint: str
    # users with an adapter on the old base, by state: a current adapter on the new base trained on
    # their current history; still to train there; cannot be trained (user -> why)
    migrated: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    unmigratable: dict[str, str] = field(default_factory=dict)

    @property
    def users(self) -> int:
        return len(self.migrated) + len(self.pending) + len(self.unmigratable)

    @property
    def complete(self) -> bool:
        """Every user of the old base is served by the new one as the old one serves them now."""
        return not self.pending and not self.unmigratable

    def done(self, allow_unmigratable: bool = False) -> bool:
        """``complete``, or, with ``allow_unmigratable``, complete but for the users that cannot be
        migrated (they have no adapter on the new base until one is imported for it)."""
        return self.complete or (allow_unmigratable and not self.pending)

    def row(self) -> dict[str, Any]:
        """One line of ``oppu users migrate``'s status (JSON)."""
        return {"variant": self.variant, "complete": self.complete, "users": self.users,
                "migrated": len(self.migrated), "pending": list(self.pending),
                "unmigratable": dict(self.unmigratable), "old_base": self.old_base,
                "old_fingerprint": self.old_fingerprint, "new_base": self.new_base,
                "new_fingerprint": self.new_fingerprint}


def on_new_bases(cfg: RunConfig, new_bases: str) -> RunConfig:
    """``cfg`` with its bases read from (and written to) ``new_bases``."""
    return dataclasses.replace(cfg, bases=new_bases)


def migration_status(cfg: RunConfig, new_bases: str) -> list[VariantMigration]:
    """Per variant of ``cfg.users.variants``: the users with an adapter on the run's base (``cfg``'s
    bases) and whether each has one on the base of the same flavour under ``new_bases``.

    ``ConfigError`` where a variant's old or new base is missing, or both are the same base.
    """
    from oppu.data.dataset import dataset_fingerprint, read_users, users_parquet_path
    from oppu.erasure import tombstone_check
    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore

    new_cfg = on_new_bases(cfg, new_bases)
    users_path = users_parquet_path(cfg.data_uri)
    users = {user.user_id: user for user in read_users(users_path)}
    erased = tombstone_check(cfg.store_uri)
    store = AdapterStore(cfg.store_uri)
    fingerprints: dict[str, str] = {}
    found = []
    for variant in cfg.users.variants:
        old_base, new_base = cfg.base_uri(cfg.variant_base(variant)), new_cfg.base_uri(cfg.variant_base(variant))
        for uri, which in ((old_base, "the run's"), (new_base, "the new")):
            if uri not in fingerprints:
                if not fsutil.exists(fsutil.join(uri, fsutil.MARKER_FILE)):
                    make = ("" if which == "the run's" else
                            f" (adapt it with `oppu train-base --config CONFIG --set run_dir={cfg.run_dir} "
                            f"--set bases={new_bases}`)")
                    raise ConfigError(f"variant {variant!r}: {which} base is not at {uri}{make}")
                fingerprints[uri] = base_fingerprint(uri)
        old_fp, new_fp = fingerprints[old_base], fingerprints[new_base]
        if old_fp == new_fp:
            raise ConfigError(f"variant {variant!r}: {new_base} is the run's base {old_base} (fingerprint "
                              f"{old_fp}): nothing to migrate")
        migrated, pending, unmigratable = [], [], {}
        for user_id in store.users(cfg.task, old_fp, variant):
            if erased(user_id):
                continue
            user = users.get(user_id)
            if user is None or user.role != "test":
                why = "not in the data set" if user is None else "a base user of the data set"
                unmigratable[user_id] = (f"{why} {users_path}: a new adapter is trained on the user's "
                                         "history (add it with `oppu users add`)")
                continue
            current = store.latest(AdapterKey(cfg.task, new_fp, variant, user_id))
            if current is not None and current.data_hash == dataset_fingerprint(user):
                migrated.append(user_id)
            else:
                pending.append(user_id)
        found.append(VariantMigration(variant, old_base, old_fp, new_base, new_fp, tuple(migrated),
                                      tuple(pending), unmigratable))
    return found


def migrate_users(cfg: RunConfig, new_bases: str, log_line=log.info
                  ) -> tuple[dict[str, list[UserResult]], list[VariantMigration]]:
    """Train every not yet migrated user of each variant onto ``new_bases`` (``migration_status``'s
    ``pending``) through the train_users stage; returns each variant's results (the unmigratable
    users among them, failed) and the status afterwards.

    A user that fails fails alone (``users.max_failed_users`` is not applied: any failure leaves the
    migration incomplete, which the status says); Ray starts only when someone is to be trained.
    """
    from oppu.pipeline import init_ray
    from oppu.preflight import check_inputs
    from oppu.training.users import train_personal_adapters

    before = migration_status(cfg, new_bases)
    todo = [status for status in before if status.pending]
    results: dict[str, list[UserResult]] = {status.variant: [] for status in before}
    for status in before:
        log_line(f"[{MIGRATE_STAGE} {status.variant}] {status.users} users on base {status.old_fingerprint}: "
                 f"{len(status.migrated)} migrated to {status.new_fingerprint} already, {len(status.pending)} "
                 f"to train, {len(status.unmigratable)} cannot be")
    if todo:
        new_cfg = on_new_bases(cfg, new_bases)
        new_cfg = dataclasses.replace(new_cfg, users=dataclasses.replace(
            new_cfg.users, variants=[status.variant for status in todo], max_failed_users=-1))
        check_inputs(new_cfg, ["users"])
        init_ray(new_cfg)
        for status in todo:
            variant_cfg = dataclasses.replace(new_cfg, users=dataclasses.replace(new_cfg.users,
                                                                                 users=list(status.pending)))
            results[status.variant] = train_personal_adapters(variant_cfg, status.variant, log=log_line,
                                                              stage=MIGRATE_STAGE)
    for status in before:
        results[status.variant] += [UserResult(user, "failed", error=why) for user, why in status.unmigratable.items()]
    return results, migration_status(cfg, new_bases)


def cut_over(run_dir: str, new_bases: str, status: list[VariantMigration], allow_unmigratable: bool = False) -> str:
    """Record ``new_bases`` as the bases of the run in ``run_dir/config.yaml`` (a local path made
    absolute), so training from now on trains on them; returns the file's URI. ``ConfigError``
    unless every variant's migration is complete (``VariantMigration.done``), or without that file."""
    import yaml

    incomplete = [s for s in status if not s.done(allow_unmigratable)]
    if incomplete:
        stuck = sorted({user for s in incomplete for user in s.unmigratable})
        raise ConfigError(
            f"not cut over: the migration of variant(s) {', '.join(s.variant for s in incomplete)} is incomplete "
            "(`oppu users migrate` trains the users still pending"
            + (f"; {', '.join(stuck)} cannot be migrated: no history to train on; --allow-unmigratable leaves "
               "them without an adapter on the new base)" if stuck else ")"))
    uri, config = read_run_config_file(run_dir)
    if config is None:
        raise ConfigError(f"{run_dir} has no config.yaml to record the new bases in: set bases: {new_bases} "
                          "in the run config")
    bases = new_bases if fsutil.is_remote(new_bases) else os.path.abspath(fsutil.local_path(new_bases))
    # The one line changed or added, so the file's comments and order stay as they were.
    text, line = fsutil.read_text(uri), yaml.safe_dump({"bases": bases}).strip()
    edited = re.sub(r"(?m)^bases:.*$", line, text) if "bases" in config else text.rstrip("\n") + "\n" + line + "\n"
    if yaml.safe_load(edited) != {**config, "bases": bases}:  # a multi-line value: write the mapping
        edited = yaml.safe_dump({**config, "bases": bases}, sort_keys=False)
    fsutil.write_text(uri, edited)
    return uri
