"""The stages of a run, in order, shared by the jobs and ``oppu quickstart``.

    prepare ─► pretrained (tiny default only) ─► train_base (per flavour) ─► train_users (per
    variant) ─► evaluate

Each stage reads and writes the run directory only, so any stage can be re-run alone
(``oppu train-base|train-users|evaluate --config ...``, or ``jobs/<stage>.py`` under ``ray job
submit``) against the same directory, locally or on a cluster.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from oppu import fsutil, logs
from oppu.run_config import RunConfig

log = logging.getLogger(__name__)

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def init_ray(cfg: RunConfig) -> None:
    """Connect to ``cfg.ray.address`` / RAY_ADDRESS, or start a local Ray instance.

    Workers get this process's log level (``oppu.logs.worker_env``: inherited by a local instance's
    workers, a runtime_env on a cluster). Their own output (Ray's and the libraries' warnings,
    transformers' bars) stays in Ray's logs unless verbose: the terminal shows the driver's progress.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return
    env = logs.worker_env()
    os.environ.update(env)  # a local instance's workers inherit the driver's environment
    verbose = logs.verbose()
    logs.quiet_ray_terminal()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=logs.ray_logging_level(),
                 runtime_env=_job_runtime_env(env))
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logs.ray_logging_level())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # else our own per-user progress says more
    log.info("[ray] connected: %s", ray.cluster_resources())


def _job_runtime_env(env: dict[str, str]) -> dict | None:
    """``env`` as a runtime_env for the workers on a cluster, without the keys a submitted job's own
    runtime_env sets (Ray refuses to merge the two where they overlap)."""
    import json

    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = set((job_config.get("runtime_env") or {}).get("env_vars") or {})
    env_vars = {k: v for k, v in env.items() if k not in taken}
    return {"env_vars": env_vars} if env_vars else None


def ensure_pretrained(cfg: RunConfig) -> str:
    """The model base adaptation starts from: for ``model: tiny``, build it on the base users' text."""
    if cfg.model != "tiny":
        return cfg.model
    target = cfg.pretrained_uri
    if fsutil.exists(fsutil.join(target, "config.json")):
        log.info("[pretrained] reusing %s", target)
        return target
    from oppu.data.dataset import read_dataset
    from oppu.models import build_tiny_base
    from oppu.training.samples import pretraining_corpus

    dataset = read_dataset(cfg.data_uri)
    corpus = pretraining_corpus(dataset.task, dataset.base_users())
    log.info("[pretrained] building the tiny default model on %d texts of %d base users (stand-in for "
             "a pretrained LLM)", len(corpus), len(dataset.base_users()))
    started = time.perf_counter()
    if fsutil.is_remote(target):
        with tempfile.TemporaryDirectory(prefix="oppu-tiny-") as tmp:
            fsutil.publish_dir(build_tiny_base(corpus, Path(tmp) / "model", cfg.tiny, cfg.seed), target)
    else:
        build_tiny_base(corpus, fsutil.local_path(target), cfg.tiny, cfg.seed)
    log.info("[pretrained] %s ready in %.0fs", target, time.perf_counter() - started)
    return target


def run_stages(cfg: RunConfig, stages: list[str], log_line=None) -> dict | None:
    """Run ``stages`` (any of ``base``, ``users``, ``evaluate``) in order; returns the metrics.

    Progress goes to the ``oppu`` logger, one step per base flavour, variant and evaluation
    (``log_line`` is not used: callers written before logging pass one).
    """
    from oppu.evaluation.runner import evaluate
    from oppu.preflight import check_inputs
    from oppu.training.base import adapt_base
    from oppu.training.users import train_personal_adapters

    check_inputs(cfg, stages)  # a missing input fails here, in one line, before Ray starts
    steps = []
    if "base" in stages:
        steps.append(("pretrained", lambda: ensure_pretrained(cfg)))
        steps += [(f"base {f}", lambda f=f: adapt_base(cfg, f, log=log.info)) for f in cfg.base.flavours]
    if "users" in stages:
        steps += [(f"users {v}", lambda v=v: train_personal_adapters(cfg, v, log=log.info))
                  for v in cfg.users.variants]
    if "evaluate" in stages:
        steps.append(("evaluate", lambda: evaluate(cfg)))
    init_ray(cfg)
    metrics = None
    with logs.progress(len(steps), "stages", unit="steps") if len(steps) > 1 else nullcontext() as bar:
        for name, step in steps:
            result = step()
            if name == "evaluate":
                metrics = result
            if bar is not None:
                bar.update(1)
                log.debug("[stages] %s done", name)
    return metrics


STAGE_COMMANDS = {  # command (and jobs/<name>.py) -> the stages it runs
    "train-base": ["base"],
    "train-users": ["users"],
    "evaluate": ["evaluate"],
    "pipeline": ["base", "users", "evaluate"],
}


def _timestamped_log():
    """A ``log(message)`` callable over the ``oppu`` logger, for scripts written before logging
    (bench/table1_real.py); configures the logger where nothing has."""
    if logs.configured_level() is None:
        logs.configure()
    return log.info
