"""``oppu users``: erase a user from a run and its store, or let an erased user back in.

    oppu users delete --run DIR --user U [--store URI] [--tokens URI] [--data URI]
    oppu users restore --run DIR --user U [--store URI]

``delete`` writes the user's tombstone, deletes every adapter version and token of theirs, drops
their records from every data file of the run (``oppu.erasure``), then scans the run directory,
data, store and token root for the user id: exit status 0 when no file mentions it, 1 (naming the
files) when some still do, 2 for bad arguments. The store, tokens and data default to what the
run's ``config.yaml`` names (``store``, ``data``), else ``DIR/adapters`` and ``DIR/data``.
``restore`` removes the tombstone only: nothing erased comes back, but the user may be trained
and published again.
"""

from __future__ import annotations

import argparse
import sys

from oppu import fsutil
from oppu.errors import ConfigError, UserIdError
from oppu.ids import validate_user_id

HELP = "Erase a user from a run dir and its adapter store (delete), or lift the erasure (restore)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("delete", "erase the user: adapters, tokens, records; tombstone them"),
                              ("restore", "remove the user's tombstone, so they may be trained again")):
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("--run", required=True, help="the run directory (a path or s3://...)")
        sub.add_argument("--user", required=True, help="user id: 1-128 letters, digits, '.', '_', '-'")
        sub.add_argument("--store", help="adapter store root (default: the run config's store, else RUN/adapters)")
        if action == "delete":
            sub.add_argument("--tokens", help="token root, where it is not the store (oppu token --store)")
            sub.add_argument("--data", help="prepared data (default: the run config's data, else RUN/data)")


def run(args: argparse.Namespace) -> int:
    from oppu.erasure import erase_user, remove_tombstone

    try:
        user = validate_user_id(args.user)
    except UserIdError as exc:
        raise ConfigError(f"--user: {exc}") from exc
    if not fsutil.exists(args.run):
        raise ConfigError(f"--run: no run directory at {args.run!r}")
    configured = _run_config_paths(args.run)
    store = args.store or configured.get("store") or fsutil.join(args.run, "adapters")
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
    import yaml

    uri = fsutil.join(run_dir, "config.yaml")
    if not fsutil.exists(uri):
        return {}
    config = yaml.safe_load(fsutil.read_text(uri)) or {}
    return {key: config[key] for key in ("store", "data") if isinstance(config.get(key), str)}
