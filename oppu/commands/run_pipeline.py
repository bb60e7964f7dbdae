"""``oppu pipeline``: base adaptation, personal adapters and evaluation in one run, on a prepared data set.

Takes the run config as ``jobs/pipeline.py`` does (``--config FILE``, ``--set key=value``), so an
installed wheel runs the stage without the repository (``run.yaml``: any run config, e.g. a copy of
``oppu/configs/lamp.yaml``; the keys are ``oppu.run_config.RunConfig``'s):

    oppu pipeline --config run.yaml --set run_dir=/shared/oppu-run
"""

from __future__ import annotations

import argparse

HELP = "Run train-base, train-users and evaluate in order against a prepared data set."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.pipeline import STAGE_COMMANDS, run_job

    return run_job(STAGE_COMMANDS["pipeline"], args.config, args.overrides)
