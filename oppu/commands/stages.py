"""``oppu train-base``, ``oppu train-users``, ``oppu evaluate`` and ``oppu pipeline``: the stages as commands.

Each takes the run config as ``jobs/<stage>.py`` does (``--config FILE``, ``--set key=value``), so an
installed wheel runs every stage without the repository (``run.yaml``: any run config, e.g. a copy of
``oppu/configs/lamp.yaml``; the keys are ``oppu.run_config.RunConfig``'s):

    oppu train-base --config run.yaml --set run_dir=/shared/oppu-run
    oppu train-users --config run.yaml --set run_dir=/shared/oppu-run
    oppu evaluate --config run.yaml --set run_dir=/shared/oppu-run
    oppu pipeline --config run.yaml --set run_dir=/shared/oppu-run     # the three in order

``jobs/*.py`` run the same through ``job_main``.

Failures are loud: a stage whose users or queries failed beyond its threshold exits 1 with one
line naming how many and which (``oppu.errors.StageFailed``), after writing its report or
metrics. ``--max-failed-users N`` (``users.max_failed_users``, default 0) and
``--max-failed-queries N`` (``eval.max_failed_queries``, default 0) raise the thresholds; -1
allows any number.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageCommand:
    """A command over ``run_job``: ``HELP``, ``add_arguments`` and ``run`` as ``oppu.cli`` wants."""

    name: str  # a key of oppu.pipeline.STAGE_COMMANDS
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from oppu.config import add_config_arguments
        from oppu.pipeline import STAGE_COMMANDS

        add_config_arguments(parser)
        add_threshold_arguments(parser, STAGE_COMMANDS[self.name])

    def run(self, args: argparse.Namespace) -> int:
        from oppu.pipeline import STAGE_COMMANDS

        return run_job(STAGE_COMMANDS[self.name], args.config, args.overrides + threshold_overrides(args))


def add_threshold_arguments(parser: argparse.ArgumentParser, stages: list[str]) -> None:
    """``--max-failed-users`` where ``stages`` train users, ``--max-failed-queries`` where they evaluate."""
    if "users" in stages:
        parser.add_argument("--max-failed-users", type=int, metavar="N", default=None,
                            help="users of a variant that may fail before the stage exits non-zero "
                                 "(users.max_failed_users, default 0; -1: any number)")
    if "evaluate" in stages:
        parser.add_argument("--max-failed-queries", type=int, metavar="N", default=None,
                            help="queries that may fail to be answered before evaluate exits non-zero "
                                 "(eval.max_failed_queries, default 0; -1: any number)")


def threshold_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides the threshold flags stand for (after the others: the flag wins)."""
    overrides = []
    if getattr(args, "max_failed_users", None) is not None:
        overrides.append(f"users.max_failed_users={args.max_failed_users}")
    if getattr(args, "max_failed_queries", None) is not None:
        overrides.append(f"eval.max_failed_queries={args.max_failed_queries}")
    return overrides


def run_job(stages: list[str], config: str | None, overrides: list[str]) -> int:
    """Load the run config (``--config FILE``, ``--set key=value``) and run ``stages``; what
    ``oppu train-base|train-users|evaluate|pipeline`` and ``jobs/*.py`` do. Prints the metrics
    table when the stages evaluate. Config and data errors raise (``ConfigError``, ``DataError``)."""
    from oppu import fsutil
    from oppu.config import load_config, to_dict
    from oppu.pipeline import run_stages
    from oppu.preflight import check_inputs
    from oppu.run_config import RunConfig

    cfg = load_config(RunConfig, config, overrides)
    check_inputs(cfg, stages)  # before the config line: a missing input is the job's one line
    log.info("[config] %s", to_dict(cfg))
    metrics = run_stages(cfg, stages)
    if metrics is not None:
        print(fsutil.read_text(fsutil.join(cfg.run_dir, "metrics.md")))
    return 0


def job_main(stages: list[str], description: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/*.py``: ``--config FILE``, ``--set key=value`` and ``-q``/``-v``, then
    the stages (``OPPU_LOG_LEVEL`` sets the level where neither switch is given)."""
    from oppu import logs
    from oppu.config import add_config_arguments

    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    add_threshold_arguments(parser, stages)
    logs.add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure_from_args(args)
    return job_exit_status(lambda: run_job(stages, args.config, args.overrides + threshold_overrides(args)))


def job_exit_status(work) -> int:
    """A job's exit status: ``work()``'s, or, with its one line on stderr, 2 for a config or data
    error and 1 for any other ``OppuError``."""
    from oppu.errors import ConfigError, DataError, OppuError

    try:
        return work()
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OppuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


TRAIN_BASE = StageCommand("train-base", "Adapt the base LLM to the task on the non-test users (Ray Train), "
                          "one base per base.flavours entry.")
TRAIN_USERS = StageCommand("train-users", "Train one personal adapter per test user and variant (Ray Data "
                           "actor pool), publishing each to the store.")
EVALUATE = StageCommand("evaluate", "Answer the test users' queries with every eval.methods entry and write "
                        "metrics.json and metrics.md.")
PIPELINE = StageCommand("pipeline", "Run train-base, train-users and evaluate in order against a prepared "
                        "data set.")
