"""``oppu prepare``: validate LaMP files and write the prepared data set every job reads.

    oppu prepare --task LaMP-2M --questions dev_questions.json --outputs dev_outputs.json \\
        --out data/lamp2m [--n-test 100] [--skip-bad-users]
    oppu prepare --task LaMP-2M --format oppu --questions user_top_100_history.json \\
        --others user_others.json --out data/lamp2m

Strict by default: any bad record stops the run (exit status 2) with every error listed, one
per line. ``--skip-bad-users`` drops the users with bad records instead, lists them on stderr
and in ``OUT/prepare_report.json``, and writes the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from oppu import fsutil
from oppu.data.records import UserData
from oppu.errors import ConfigError, DataError

HELP = "Validate LaMP files and write the prepared data set (users.parquet + dataset.json)."
REPORT_FILE = "prepare_report.json"
DEFAULT_N_TEST = 100  # the paper's 100 most active users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="LaMP task, e.g. LaMP-2M, LaMP_3, lamp-1")
    parser.add_argument("--questions", required=True,
                        help="LaMP *_questions.json, or with --format oppu the per-user JSON "
                             "(user_top_100_history.json) whose users are the test users")
    parser.add_argument("--outputs", help="LaMP *_outputs.json with the gold outputs (--format lamp)")
    parser.add_argument("--others", help="with --format oppu: user_others.json, whose users train "
                                         "the base model")
    parser.add_argument("--out", required=True, help="output directory: a path or fsspec URI")
    parser.add_argument("--n-test", type=int, default=None,
                        help=f"how many most active users become test users (--format lamp; "
                             f"default {DEFAULT_N_TEST})")
    parser.add_argument("--format", choices=("lamp", "oppu"), default="lamp",
                        help="official LaMP files (default) or the OPPU authors' per-user JSON")
    parser.add_argument("--skip-bad-users", action="store_true",
                        help="drop users with bad records (listed in prepare_report.json) "
                             "instead of failing")


def _read_lamp_users(task, args: argparse.Namespace) -> tuple[list[UserData], list[DataError], dict]:
    from oppu.data.dataset import assign_roles
    from oppu.data.lamp_io import read_lamp

    if not args.outputs:
        raise ConfigError("--outputs: required with --format lamp (the *_outputs.json golds)")
    if args.others:
        raise ConfigError("--others: only with --format oppu")
    users, errors = read_lamp(task, args.questions, args.outputs, collect_errors=True)
    n_test = DEFAULT_N_TEST if args.n_test is None else args.n_test
    sources = {"format": "lamp", "questions": args.questions, "outputs": args.outputs}
    if errors and not args.skip_bad_users:
        return users, errors, sources
    return assign_roles(users, n_test), errors, sources


def _read_oppu_users(task, args: argparse.Namespace) -> tuple[list[UserData], list[DataError], dict]:
    from oppu.data.lamp_io import read_oppu_format

    if args.outputs:
        raise ConfigError("--outputs: not used with --format oppu (golds are in the per-user file)")
    if args.n_test is not None:
        raise ConfigError("--n-test: with --format oppu the --questions file fixes the test users")
    test_users, errors = read_oppu_format(task, args.questions, collect_errors=True)
    base_users: list[UserData] = []
    if args.others:
        base_users, other_errors = read_oppu_format(task, args.others, collect_errors=True)
        errors += other_errors
        test_ids = {user.user_id for user in test_users}
        for user in base_users:
            if user.user_id in test_ids:
                errors.append(DataError(f"user is also a test user in {args.questions}",
                                        file=args.others, record=user.user_id, field="user_id",
                                        user=user.user_id))
        base_users = [user for user in base_users if user.user_id not in test_ids]
    for user in test_users:
        user.role = "test"
    for user in base_users:
        user.role = "base"
    sources = {"format": "oppu", "questions": args.questions, "others": args.others}
    return test_users + base_users, errors, sources


def _report(errors: list[DataError], kept: list[UserData]) -> dict:
    kept_ids = {user.user_id for user in kept}
    dropped = sorted({error.user for error in errors
                      if error.user is not None and error.user not in kept_ids})
    return {
        "n_errors": len(errors),
        "dropped_users": dropped,
        "errors": [{"message": str(error), "file": error.file, "record": error.record,
                    "field": error.field, "user": error.user} for error in errors],
    }


def run(args: argparse.Namespace) -> int:
    from oppu.data.dataset import write_dataset
    from oppu.tasks import get_task

    task = get_task(args.task)
    read = _read_oppu_users if args.format == "oppu" else _read_lamp_users
    users, errors, sources = read(task, args)

    for error in errors:
        print(f"oppu prepare: error: {error}", file=sys.stderr)
    if errors and not args.skip_bad_users:
        print(f"oppu prepare: {len(errors)} bad record(s); nothing written "
              "(--skip-bad-users drops the users they belong to)", file=sys.stderr)
        return 2
    if not users:
        raise DataError("no valid users left to write", file=args.questions)

    report = _report(errors, users)
    if report["dropped_users"]:
        print(f"oppu prepare: dropped {len(report['dropped_users'])} user(s) with bad records: "
              f"{', '.join(report['dropped_users'])}", file=sys.stderr)
    out = write_dataset(args.out, task.name, users,
                        {"sources": sources, "dropped_users": report["dropped_users"]})
    fsutil.write_json(fsutil.join(str(args.out), REPORT_FILE), report)

    n_test = sum(user.role == "test" for user in users)
    if n_test == len(users):
        print("oppu prepare: note: no base users, so base task adaptation has no data "
              "(give --others with --format oppu)", file=sys.stderr)
    n_items = sum(len(user.history) for user in users)
    n_queries = sum(len(user.queries) for user in users)
    where = out if isinstance(out, str) else Path(out).resolve()
    print(f"prepared {task.name}: {len(users)} users ({n_test} test, {len(users) - n_test} base), "
          f"{n_items} history items, {n_queries} queries")
    print(f"wrote {fsutil.join(str(where), 'users.parquet')}, dataset.json and {REPORT_FILE}")
    return 0
