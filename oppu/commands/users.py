"""``oppu users``: onboard a user's history, train just them, erase them, or let them back in.

    oppu users add --run DIR --user U --history FILE [--data URI] [--store URI]
    oppu users train --run DIR --user U [--user U2 ...] [--config FILE] [--set KEY=VALUE ...]
    oppu users delete --run DIR --user U [--store URI] [--tokens URI] [--data URI]
    oppu users restore --run DIR --user U [--store URI]
    oppu users migrate --run DIR --to-bases DIR2 [--status | --cut-over] [--config FILE] [--set KEY=VALUE ...]

``add`` validates FILE, a JSON list of the task's LaMP profile items (a LaMP question's
``"profile"``; queries are not accepted), as ``oppu prepare`` does (exit status 2 listing every
bad item by file, item id and field), and adds them to the user's history in the run's data set;
a new user joins as a test user. An erased (tombstoned) user is refused with exit status 2.
``train`` trains the named users' adapters for every variant of the run config (``--config``,
else ``DIR/config.yaml``; ``--set`` overrides as the stage commands take them) through
``train_users``'s actor pool and publishes a new version each; nobody else is trained. Exit
status 1 when a user failed (see ``DIR/reports/train_users-<variant>.json``).

``delete`` writes the user's tombstone, deletes every adapter version and token of theirs, drops
their records from every data file of the run (``oppu.erasure``), then scans the run directory,
data, store and token root for the user id: exit status 0 when no file mentions it, 1 (naming the
files) when some still do, 2 for bad arguments. The store, tokens and data default to what the
run's ``config.yaml`` names (``store``, ``data``), else ``DIR/adapters`` and ``DIR/data``.
``restore`` removes the tombstone only: nothing erased comes back, but the user may be trained
and published again.

``migrate`` is a base upgrade's migration (``oppu.migration``): DIR2 holds new bases (``base/``,
``base-<flavour>/``, as ``oppu train-base --set bases=DIR2`` adapts them); every user with an
adapter on the run's base is trained onto DIR2's base of the same flavour, for every variant,
through ``train_users``'s actor pool (resumable: users already migrated are not trained again),
while the serve app goes on serving the old adapters. It prints each trained user's line as
``train`` does, then one JSON line per variant (``complete``, ``users``, ``migrated``, ``pending``,
``unmigratable``, the old and new bases and fingerprints); exit status 0 when every variant is
complete, 1 when not. ``--status`` prints the lines only, training nobody; ``--cut-over``, once
complete, records DIR2 as ``bases`` in ``DIR/config.yaml``, so training goes to the new bases
from then on (the serve app cuts over by its own config: docs/cluster.md, *Base upgrade*).
``jobs/migrate_users.py`` runs the same as a Ray job.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from oppu import fsutil
from oppu.errors import ConfigError, UserIdError
from oppu.ids import validate_user_id

if TYPE_CHECKING:
    from oppu.run_config import RunConfig

HELP = ("Add a user's history (add), train just them (train), erase them from a run dir and its "
        "adapter store (delete), lift the erasure (restore), or move every user onto new bases (migrate).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_help = "add history items to a user of the run's data set (a new user joins as a test user)"
    add = actions.add_parser("add", help=add_help, description=add_help)
    add.add_argument("--run", required=True, help="the run directory (a path or s3://...)")
    add.add_argument("--user", required=True, help="user id: 1-128 letters, digits, '.', '_', '-'")
    add.add_argument("--history", required=True,
                     help="JSON list of the task's LaMP profile items, as in a LaMP question's "
                          "\"profile\" ({\"id\", the task's fields, \"date\"?}); history only, "
                          "queries are not accepted; items the user already has (same id) are skipped")
    add.add_argument("--data", help="prepared data (default: the run config's data, else RUN/data)")
    add.add_argument("--store", help="adapter store root, for the erasure check (default: the run "
                                     "config's store, else RUN/adapters)")
    train_help = "train the named users' adapters for every variant of the run config and publish them"
    train = actions.add_parser("train", help=train_help, description=train_help)
    train.add_argument("--run", required=True, help="the run directory (a path or s3://...)")
    train.add_argument("--user", dest="users", action="append", required=True,
                       help="a test user to train (repeatable); nobody else is trained")
    add_config_arguments(train)
    migrate_help = ("train every user with an adapter on the run's bases onto new bases (a base upgrade), "
                    "or say whether that is done")
    migrate = actions.add_parser("migrate", help=migrate_help, description=migrate_help)
    migrate.add_argument("--run", required=True, help="the run directory (a path or s3://...)")
    add_migrate_arguments(migrate)
    migrate.add_argument("--cut-over", action="store_true",
                         help="once every variant is complete, record --to-bases as `bases` in "
                              "RUN/config.yaml, so training goes to the new bases from then on (nothing "
                              "is trained)")
    add_config_arguments(migrate)
    for action, help_text in (("delete", "erase the user: adapters, tokens, records; tombstone them"),
                              ("restore", "remove the user's tombstone, so they may be trained again")):
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("--run", required=True, help="the run directory (a path or s3://...)")
        sub.add_argument("--user", required=True, help="user id: 1-128 letters, digits, '.', '_', '-'")
        sub.add_argument("--store", help="adapter store root (default: the run config's store, else RUN/adapters)")
        if action == "delete":
            sub.add_argument("--tokens", help="token root, where it is not the store (oppu token --store)")
            sub.add_argument("--data", help="prepared data (default: the run config's data, else RUN/data)")


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--to-bases`` and ``--status``: ``oppu users migrate``'s and ``jobs/migrate_users.py``'s."""
    parser.add_argument("--to-bases", required=True, metavar="DIR2",
                        help="the folder of the new bases (base/, base-<flavour>/; a path or s3://...), as "
                             "`oppu train-base --set bases=DIR2` adapts them")
    parser.add_argument("--status", action="store_true",
                        help="only print where the migration stands (exit 0: complete); train nobody")
    parser.add_argument("--allow-unmigratable", action="store_true",
                        help="count the migration complete though users with no history to train on (e.g. an "
                             "imported adapter) have no adapter on the new base; they are named, and served 404 "
                             "after the cut-over until one is imported for it")


def run(args: argparse.Namespace) -> int:
    from oppu.erasure import erase_user, remove_tombstone

    if args.action == "train":
        return _train(args)
    if args.action == "migrate":
        if args.cut_over and args.status:
            raise ConfigError("--cut-over and --status: give one")
        if args.cut_over and args.config is not None:
            raise ConfigError(f"--cut-over records the new bases in {args.run}/config.yaml; with --config, "
                              f"set bases: {args.to_bases} in that file instead")
        cfg = load_run_config(args.run, args.config, args.overrides)
        return migrate(cfg, args.to_bases, status_only=args.status or args.cut_over,
                       cut_over_run=args.run if args.cut_over else None,
                       allow_unmigratable=args.allow_unmigratable)
    try:
        user = validate_user_id(args.user)
    except UserIdError as exc:
        raise ConfigError(f"--user: {exc}") from exc
    if not fsutil.exists(args.run):
        raise ConfigError(f"--run: no run directory at {args.run!r}")
    configured = _run_config_paths(args.run)
    store = args.store or configured.get("store") or fsutil.join(args.run, "adapters")
    if args.action == "add":
        return _add(args, user, args.data or configured.get("data") or fsutil.join(args.run, "data"), store)
    if args.action == "restore":
        lifted = remove_tombstone(store, user)
        print(f"user {user!r}: {'tombstone removed' if lifted else 'had no tombstone'} in {store}",
              file=sys.stderr)
        return 0
    data = args.data or configured.get("data") or fsutil.join(args.run, "data")
    report = erase_user(args.run, user, store_uri=store, token_uri=args.tokens, data_uri=data)
    print(f"user {user!r}: {report.adapter_versions} adapter version(s) and {report.tokens_revoked} "
          f"token(s) deleted; records removed from {len(report.records_removed)} file(s) "
          f"({sum(report.records_removed.values())} in all); the id redacted in "
          f"{len(report.redacted)} file(s); tombstone written in {store}", file=sys.stderr)
    if report.was_base_user:
        print("note: a base user: the bases were adapted on their queries; adapt the bases again "
              "(oppu train-base) to remove that influence", file=sys.stderr)
    for uri in report.not_scanned:
        print(f"not scanned (over the scan limit; model weights): {uri}", file=sys.stderr)
    if report.remaining:
        for uri in report.remaining:
            print(f"still mentions the user: {uri}", file=sys.stderr)
        return 1
    return 0


def _run_config_paths(run_dir: str) -> dict[str, str]:
    """``store`` and ``data`` from the run's ``config.yaml``, where it has them."""
    from oppu.run_config import read_run_config_file

    config = read_run_config_file(run_dir)[1] or {}
    return {key: config[key] for key in ("store", "data") if isinstance(config.get(key), str)}


def _add(args: argparse.Namespace, user: str, data: str, store: str) -> int:
    from oppu.errors import UserErasedError
    from oppu.user_history import HistoryErrors, add_user_history

    try:
        update = add_user_history(data, store, user, args.history)
    except UserErasedError as exc:
        raise ConfigError(str(exc)) from None
    except HistoryErrors as exc:
        for error in exc.errors:
            print(f"oppu users add: error: {error}", file=sys.stderr)
        print(f"oppu users add: {len(exc.errors)} bad history item(s); nothing written", file=sys.stderr)
        return 2
    what = "new test user" if update.created else f"{update.user.role} user"
    print(f"user {user!r} ({what}): {update.added} history item(s) added, {update.already_there} already "
          f"there; {len(update.user.history)} in all in {data}")
    if update.user.role != "test":
        print(f"note: {user!r} is a base user: base users get no personal adapter", file=sys.stderr)
    elif update.added:
        print(f"train their adapter: oppu users train --run {args.run} --user {user}")
    return 0


def load_run_config(run: str, config: str | None, overrides: list[str]):
    """The ``RunConfig`` of the run directory ``run``: ``config`` (a YAML file) where given, else
    ``RUN/config.yaml``; ``run_dir`` set to ``run``, then ``overrides`` (``--set``) on top."""
    from oppu.config import load_config
    from oppu.run_config import RunConfig, read_run_config_file

    if not fsutil.exists(run):
        raise ConfigError(f"--run: no run directory at {run!r}")
    run_config = None
    if config is None:
        run_config = read_run_config_file(run)[1]
        if run_config is None:
            raise ConfigError(f"--config: {run} has no config.yaml (oppu quickstart writes one); "
                              "give the run config with --config FILE")
    # run_dir first, so a --set of the caller's wins; a copied run dir trains where it now is
    return load_config(RunConfig, config, [f"run_dir={run}", *overrides], base=run_config)


def _train(args: argparse.Namespace) -> int:
    from oppu.errors import UserErasedError
    from oppu.onboarding import train_named_users

    cfg = load_run_config(args.run, args.config, args.overrides)
    try:
        results = train_named_users(cfg, args.users)
    except UserErasedError as exc:
        raise ConfigError(str(exc)) from None
    failed = 0
    for variant, variant_results in results.items():
        for result in variant_results:
            detail = result.version if result.status != "failed" else result.error
            print(f"{variant}\t{result.user_id}\t{result.status}\t{detail}")
            failed += result.status == "failed"
    return 1 if failed else 0


def migrate(cfg: RunConfig, to_bases: str, *, status_only: bool = False, cut_over_run: str | None = None,
            allow_unmigratable: bool = False) -> int:
    """Train the users still to migrate onto ``to_bases`` (unless ``status_only``), print each
    trained user's line and each variant's status line; with ``cut_over_run``, once complete,
    record the new bases in that run's ``config.yaml``. 0 when every variant is complete (with
    ``allow_unmigratable``, but for the users that cannot be migrated), else 1."""
    import json

    from oppu.migration import cut_over, migrate_users, migration_status

    if status_only:
        status = migration_status(cfg, to_bases)
    else:
        results, status = migrate_users(cfg, to_bases)
        for variant, variant_results in results.items():
            for result in variant_results:
                detail = result.version if result.status != "failed" else result.error
                print(f"{variant}\t{result.user_id}\t{result.status}\t{detail}")
    for variant_status in status:
        print(json.dumps(variant_status.row()))
    left_behind = sorted({user for s in status for user in s.unmigratable})
    if allow_unmigratable and left_behind and all(s.done(True) for s in status):
        print(f"left behind (no history to train on; no adapter on the new base until one is imported for it): "
              f"{', '.join(left_behind)}", file=sys.stderr)
    if cut_over_run is not None:
        uri = cut_over(cut_over_run, to_bases, status, allow_unmigratable)
        print(f"cut over: {uri} now names bases {to_bases}; serve each variant with model=<its new_base> "
              "(docs/cluster.md, Base upgrade)", file=sys.stderr)
    elif all(s.done(allow_unmigratable) for s in status):
        print("migration complete: cut over with `oppu users migrate --cut-over` and the serve app's model "
              "set to the new_base above (docs/cluster.md, Base upgrade)", file=sys.stderr)
    return 0 if all(s.done(allow_unmigratable) for s in status) else 1


def migrate_job_main(description: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/migrate_users.py``: ``--config FILE``, ``--set key=value``, ``--to-bases``,
    ``--status`` and ``-q``/``-v``, then ``migrate``; exit status as ``oppu users migrate``'s (2 for a
    config or data error)."""
    from oppu import logs
    from oppu.commands.stages import job_exit_status
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    args = migrate_job_parser(description).parse_args(argv)
    logs.configure_from_args(args)
    return job_exit_status(lambda: migrate(load_config(RunConfig, args.config, args.overrides), args.to_bases,
                                           status_only=args.status, allow_unmigratable=args.allow_unmigratable))


def migrate_job_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``jobs/migrate_users.py``."""
    from oppu import logs
    from oppu.config import add_config_arguments

    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    add_migrate_arguments(parser)
    logs.add_arguments(parser)
    return parser
