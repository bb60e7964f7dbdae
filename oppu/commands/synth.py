"""``oppu synth``: write a synthetic LaMP-format data set with planted per-user preferences."""

from __future__ import annotations

import argparse
import json

HELP = ("Generate synthetic LaMP-format files (questions.json, outputs.json) with planted per-user "
        "preferences and reference.json (population and Bayes-optimal scores).")


def default_n_test(n_users: int) -> int:
    """About a quarter of the users, at least one, always leaving base users."""
    return max(1, min(n_users // 4, n_users - 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="LaMP-1, LaMP-2N, LaMP-2M, LaMP-3, LaMP-4, LaMP-5 or LaMP-7")
    parser.add_argument("--users", type=int, required=True, help="number of users (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-test", type=int, default=None,
                        help="test users: the most active ones (default: a quarter of the users)")
    parser.add_argument("--queries-per-user", type=int, default=5, help="queries per user (their latest events)")
    parser.add_argument("--shift-at", type=float, default=None, metavar="FRACTION",
                        help="LaMP-2M, LaMP-2N: every user takes up another persona's taste from this "
                             "fraction of their history on (and at their queries); reference.json says "
                             "where (users.<id>.shift)")


def run(args: argparse.Namespace) -> int:
    from oppu.data.synth import generate
    from oppu.errors import ConfigError

    if args.users < 2:
        raise ConfigError(f"--users: need at least 2 users (test and base), got {args.users}")
    n_test = default_n_test(args.users) if args.n_test is None else args.n_test
    paths = generate(args.task, args.users, args.seed, args.out, n_test, queries_per_user=args.queries_per_user,
                     shift_at=args.shift_at)
    reference = json.loads(paths.reference.read_text(encoding="utf-8"))
    print(f"wrote {paths.questions}, {paths.outputs}, {paths.reference}")
    print(f"{reference['task']}: {reference['n_users']} users ({reference['n_test_users']} test), "
          f"{reference['queries_per_user']} queries each, personas: {', '.join(reference['personas'])}")
    print(json.dumps({"population": reference["population"], "bayes": reference["bayes"]}))
    return 0
