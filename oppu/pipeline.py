"""The stages of a run, in order, shared by the jobs and ``oppu quickstart``.

    prepare ─► pretrained (tiny default only) ─► train_base (per flavour) ─► train_users (per
    variant) ─► evaluate

Each stage reads and writes the run directory only, so any stage can be re-run alone
(``oppu train-base|train-users|evaluate --config ...``, or ``jobs/<stage>.py`` under ``ray job
submit``) against the same directory, locally or on a cluster.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from oppu import fsutil
from oppu.run_config import RunConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def init_ray(cfg: RunConfig, log=print) -> None:
    """Connect to ``cfg.ray.address`` / RAY_ADDRESS, or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own per-user progress lines say more
    log(f"[ray] connected: {ray.cluster_resources()}")


def ensure_pretrained(cfg: RunConfig, log=print) -> str:
    """The model base adaptation starts from: for ``model: tiny``, build it on the base users' text."""
    if cfg.model != "tiny":
        return cfg.model
    target = cfg.pretrained_uri
    if fsutil.exists(fsutil.join(target, "config.json")):
        log(f"[pretrained] reusing {target}")
        return target
    from oppu.data.dataset import read_dataset
    from oppu.models import build_tiny_base
    from oppu.training.samples import pretraining_corpus

    dataset = read_dataset(cfg.data_uri)
    corpus = pretraining_corpus(dataset.task, dataset.base_users())
    log(f"[pretrained] building the tiny default model on {len(corpus)} texts of "
        f"{len(dataset.base_users())} base users (stand-in for a pretrained LLM)")
    started = time.perf_counter()
    if fsutil.is_remote(target):
        with tempfile.TemporaryDirectory(prefix="oppu-tiny-") as tmp:
            fsutil.publish_dir(build_tiny_base(corpus, Path(tmp) / "model", cfg.tiny, cfg.seed), target)
    else:
        build_tiny_base(corpus, fsutil.local_path(target), cfg.tiny, cfg.seed)
    log(f"[pretrained] {target} ready in {time.perf_counter() - started:.0f}s")
    return target


def run_stages(cfg: RunConfig, stages: list[str], log=print) -> dict | None:
    """Run ``stages`` (any of ``base``, ``users``, ``evaluate``) in order; returns the metrics."""
    from oppu.evaluation.runner import evaluate
    from oppu.preflight import check_inputs
    from oppu.training.base import adapt_base
    from oppu.training.users import train_personal_adapters

    check_inputs(cfg, stages)  # a missing input fails here, in one line, before Ray starts
    init_ray(cfg, log)
    metrics = None
    if "base" in stages:
        ensure_pretrained(cfg, log)
        for flavour in cfg.base.flavours:
            adapt_base(cfg, flavour, log)
    if "users" in stages:
        for variant in cfg.users.variants:
            train_personal_adapters(cfg, variant, log)
    if "evaluate" in stages:
        metrics = evaluate(cfg, log)
    return metrics


STAGE_COMMANDS = {  # command (and jobs/<name>.py) -> the stages it runs
    "train-base": ["base"],
    "train-users": ["users"],
    "evaluate": ["evaluate"],
    "pipeline": ["base", "users", "evaluate"],
}


def run_job(stages: list[str], config: str | None, overrides: list[str]) -> int:
    """Load the run config (``--config FILE``, ``--set key=value``) and run ``stages``; what
    ``oppu train-base|train-users|evaluate|pipeline`` and ``jobs/*.py`` do. Prints the metrics
    table when the stages evaluate. Config and data errors raise (``ConfigError``, ``DataError``)."""
    from oppu.config import load_config, to_dict

    cfg = load_config(RunConfig, config, overrides)
    log = _timestamped_log()
    log(f"[config] {to_dict(cfg)}")
    metrics = run_stages(cfg, stages, log)
    if metrics is not None:
        print(fsutil.read_text(fsutil.join(cfg.run_dir, "metrics.md")))
    return 0


def job_main(stages: list[str], description: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/*.py``: ``--config FILE`` and ``--set key=value``, then the stages."""
    import argparse
    import sys

    from oppu.config import add_config_arguments
    from oppu.errors import ConfigError, DataError, OppuError

    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_job(stages, args.config, args.overrides)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OppuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _timestamped_log():
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s {message}", flush=True)

    return log
