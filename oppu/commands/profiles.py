"""``oppu profiles``: write every user's textual profile (PAG) once, beside the run's data."""

from __future__ import annotations

import argparse

HELP = "Write each user's textual profile (paper Appendix I) into DIR/data/profiles-<writer>.parquet."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    parser.add_argument("--run", required=True, help="run directory (a quickstart or pipeline output)")
    parser.add_argument("--writer", choices=("statistical", "hf", "openai"), default=None,
                        help="profile writer (default: the run config's profiles.writer, statistical)")
    parser.add_argument("--model", default=None, help="hf: instruction-tuned model id or path; "
                        "openai: the endpoint's model name")
    parser.add_argument("--base-url", default=None, help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--show", type=int, default=3, help="print this many profiles (default 3)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.analysis.runs import load_run_config
    from oppu.data.dataset import read_dataset
    from oppu.profiles import profiles_uri, run_profiles

    overrides = list(args.overrides)
    for key, value in (("profiles.writer", args.writer), ("profiles.model", args.model),
                       ("profiles.base_url", args.base_url)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_run_config(args.run, args.config, overrides)
    dataset = read_dataset(cfg.data_uri)
    profiles = run_profiles(cfg, dataset.users)
    print(f"{len(profiles)} {cfg.profiles.writer} profiles in {profiles_uri(cfg.data_uri, cfg.profiles.writer)}")
    for user_id in sorted(profiles)[:args.show]:
        print(f"  {user_id}: {profiles[user_id]}")
    return 0
