"""``oppu analyze``: the paper's analysis suites over a finished run, each with a plot."""

from __future__ import annotations

import argparse

HELP = "Run an analysis suite (or all) over a run directory: JSON, PNG and a report.md section."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.analysis.suites import MODULES, SuiteOptions
    from oppu.config import add_config_arguments

    defaults = SuiteOptions()
    parser.add_argument("--suite", required=True, choices=[*MODULES, "all"], help="which analysis")
    parser.add_argument("--run", required=True, help="run directory (a quickstart or pipeline output)")
    parser.add_argument("--users", type=int, default=defaults.users,
                        help=f"test users per training suite (default {defaults.users})")
    parser.add_argument("--buckets", type=int, default=defaults.buckets, help="activity: buckets")
    parser.add_argument("--per-bucket", type=int, default=defaults.per_bucket, help="activity: users per bucket")
    parser.add_argument("--activity-base-samples", type=int, default=defaults.activity_base_samples,
                        help="activity: cap on the held-out base's training samples")
    parser.add_argument("--activity-reuse-pretrained", action="store_true",
                        help="activity: start the held-out base from the run's pretrained tiny model "
                        "instead of pretraining one without the bucket users (faster)")
    parser.add_argument("--keep-fraction", type=float, default=defaults.keep_fraction,
                        help="behaviour-shift: share of each history kept (the least relevant)")
    parser.add_argument("--embedding-model", default=None, help="behaviour-shift: HF embedding model "
                        "id/path for relevance (default: the lexical TF-IDF fallback)")
    parser.add_argument("--variant", default=defaults.variant, help="adapter-similarity: adapter variant")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import ray

    from oppu import logs
    from oppu.analysis.runs import load_run_config
    from oppu.analysis.suites import SuiteOptions, run_suite, suite_names

    cfg = load_run_config(args.run, args.config, args.overrides)
    options = SuiteOptions(users=args.users, buckets=args.buckets, per_bucket=args.per_bucket,
                           activity_base_samples=args.activity_base_samples,
                           activity_fresh_pretrained=not args.activity_reuse_pretrained,
                           keep_fraction=args.keep_fraction, embedding_model=args.embedding_model,
                           variant=args.variant)
    names = suite_names(args.suite)
    try:
        with logs.progress(len(names), "analyze", unit="suites") as bar:
            for name in names:
                written = run_suite(name, cfg, options)
                bar.update(1)
        print(f"report: {written['report']}")
    finally:
        ray.shutdown()
    return 0
