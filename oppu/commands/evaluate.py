"""``oppu evaluate``: answer the test users' queries with every method (Ray Data batch inference) and score them.

Takes the run config as ``jobs/evaluate.py`` does (``--config FILE``, ``--set key=value``), so an
installed wheel runs the stage without the repository (``run.yaml``: any run config, e.g. a copy of
``oppu/configs/lamp.yaml``; the keys are ``oppu.run_config.RunConfig``'s):

    oppu evaluate --config run.yaml --set run_dir=/shared/oppu-run
"""

from __future__ import annotations

import argparse

HELP = "Answer the test users' queries with every eval.methods entry and write metrics.json and metrics.md."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.pipeline import STAGE_COMMANDS, run_job

    return run_job(STAGE_COMMANDS["evaluate"], args.config, args.overrides)
