"""``oppu train-base``: adapt the base LLM to the task on the non-test users (Ray Train), one base per flavour.

Takes the run config as ``jobs/train_base.py`` does (``--config FILE``, ``--set key=value``), so an
installed wheel runs the stage without the repository (``run.yaml``: any run config, e.g. a copy of
``oppu/configs/lamp.yaml``; the keys are ``oppu.run_config.RunConfig``'s):

    oppu train-base --config run.yaml --set run_dir=/shared/oppu-run
"""

from __future__ import annotations

import argparse

HELP = "Adapt the base LLM to the task on the non-test users (Ray Train), one base per base.flavours entry."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.pipeline import STAGE_COMMANDS, run_job

    return run_job(STAGE_COMMANDS["train-base"], args.config, args.overrides)
