"""``oppu train-users``: one personal adapter per test user (a Ray Data actor pool), published to the store.

Takes the run config as ``jobs/train_users.py`` does (``--config FILE``, ``--set key=value``), so an
installed wheel runs the stage without the repository (``run.yaml``: any run config, e.g. a copy of
``oppu/configs/lamp.yaml``; the keys are ``oppu.run_config.RunConfig``'s):

    oppu train-users --config run.yaml --set run_dir=/shared/oppu-run
"""

from __future__ import annotations

import argparse

HELP = "Train one personal adapter per test user and variant (Ray Data actor pool), publishing each to the store."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.pipeline import STAGE_COMMANDS, run_job

    return run_job(STAGE_COMMANDS["train-users"], args.config, args.overrides)
