"""``oppu train-base``, ``oppu train-users``, ``oppu evaluate`` and ``oppu pipeline``: the stages as commands.

Each takes the run config as ``jobs/<stage>.py`` does (``--config FILE``, ``--set key=value``), so an
installed wheel runs every stage without the repository (``run.yaml``: any run config, e.g. a copy of
``oppu/configs/lamp.yaml``; the keys are ``oppu.run_config.RunConfig``'s):

    oppu train-base --config run.yaml --set run_dir=/shared/oppu-run
    oppu train-users --config run.yaml --set run_dir=/shared/oppu-run
    oppu evaluate --config run.yaml --set run_dir=/shared/oppu-run
    oppu pipeline --config run.yaml --set run_dir=/shared/oppu-run     # the three in order
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class StageCommand:
    """A command over ``oppu.pipeline.run_job``: ``HELP``, ``add_arguments`` and ``run`` as ``oppu.cli`` wants."""

    name: str  # a key of oppu.pipeline.STAGE_COMMANDS
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from oppu.config import add_config_arguments

        add_config_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from oppu.pipeline import STAGE_COMMANDS, run_job

        return run_job(STAGE_COMMANDS[self.name], args.config, args.overrides)


TRAIN_BASE = StageCommand("train-base", "Adapt the base LLM to the task on the non-test users (Ray Train), "
                          "one base per base.flavours entry.")
TRAIN_USERS = StageCommand("train-users", "Train one personal adapter per test user and variant (Ray Data "
                           "actor pool), publishing each to the store.")
EVALUATE = StageCommand("evaluate", "Answer the test users' queries with every eval.methods entry and write "
                        "metrics.json and metrics.md.")
PIPELINE = StageCommand("pipeline", "Run train-base, train-users and evaluate in order against a prepared "
                        "data set.")
