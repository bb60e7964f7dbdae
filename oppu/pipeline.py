"""The stages of a run, in order, shared by the jobs and ``oppu quickstart``.

    prepare ─► pretrained (tiny default only) ─► train_base (every flavour in one Ray Train run)
    ─► train_users (per variant) ─► evaluate

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
from oppu.run_config import RunConfig, parse_flavour

log = logging.getLogger(__name__)

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def init_ray(cfg: RunConfig) -> None:
    """Connect to ``cfg.ray.address`` / RAY_ADDRESS, else to the cluster ``ray start`` last started on
    this machine (as ``ray.init()`` finds it), or start a local Ray instance.

    Workers get this process's log level (``oppu.logs.worker_env``: inherited by a local instance's
    workers, a runtime_env on a cluster). Their own output (Ray's and the libraries' warnings,
    transformers' bars) stays in Ray's logs unless verbose: the terminal shows the driver's progress,
    without the notices of the driver's own core worker (``oppu.logs.filter_native_stderr``).
    """
    import ray
    import ray.data

    if ray.is_initialized():
        return
    env = logs.worker_env()
    os.environ.update(env)  # a local instance's workers inherit the driver's environment
    verbose = logs.verbose()
    logs.quiet_ray_terminal()
    logs.filter_native_stderr()  # Ray Data's notice on pool actors' constructor arguments
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or started_cluster()
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=logs.ray_logging_level(),
                 runtime_env=_job_runtime_env(env))
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logs.ray_logging_level())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # else our own per-user progress says more
    log.info("[ray] connected: %s", ray.cluster_resources())


def started_cluster() -> str | None:
    """The address of the cluster ``ray start`` last started on this machine (what ``ray.init()``
    without an address joins: ``ray_current_cluster`` under Ray's temp dir, ``$RAY_TMPDIR/ray``
    or ``/tmp/ray``; ``ray stop`` removes it), or None. Joined explicitly: ``ray.init(num_cpus=...)``
    refuses to join one."""
    from ray._private.utils import read_ray_address

    try:
        return read_ray_address() or None
    except OSError:
        return None


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

    Base flavours are adapted in one Ray Train run, one after another (``adapt_bases``: the run's
    start and the model load are paid once), or with ``base.parallel_flavours`` > 1 that many at a
    time, each its own run; personal variants are trained ``users.parallel_variants`` at a time
    (each its own actor pool). Runs at once share the cluster's resources; stages still run one
    after another. Progress goes to the ``oppu`` logger: a line per base flavour as it is published,
    a step per base stage (per flavour where they run apart), variant and evaluation (``log_line``
    is not used: callers written before logging pass one).
    """
    from oppu.evaluation.runner import evaluate
    from oppu.preflight import check_inputs
    from oppu.training.base import adapt_base, adapt_bases
    from oppu.training.users import train_personal_adapters

    check_inputs(cfg, stages)  # a missing input fails here, in one line, before Ray starts
    groups: list[tuple[list[tuple[str, object]], int]] = []  # (named steps, how many run at once)
    if "base" in stages:
        groups.append(([("pretrained", lambda: ensure_pretrained(cfg))], 1))
        if cfg.base.parallel_flavours > 1:
            if any(parse_flavour(f, cfg.base.rag_k)[0] for f in cfg.base.flavours):
                # Written once before the flavours start: two profile flavours at once would both write them.
                groups.append(([("profiles", lambda: _write_profiles(cfg))], 1))
            groups.append(([(f"base {f}", lambda f=f: adapt_base(cfg, f, log=log.info)) for f in cfg.base.flavours],
                           cfg.base.parallel_flavours))
        else:
            groups.append(([("base", lambda: adapt_bases(cfg, cfg.base.flavours, log=log.info))], 1))
    if "users" in stages:
        groups.append(([(f"users {v}", lambda v=v: train_personal_adapters(cfg, v, log=log.info))
                        for v in cfg.users.variants], cfg.users.parallel_variants))
    if "evaluate" in stages:
        groups.append(([("evaluate", lambda: evaluate(cfg))], 1))
    init_ray(cfg)
    results: dict[str, object] = {}
    n_steps = sum(len(steps) for steps, _ in groups)
    with logs.progress(n_steps, "stages", unit="steps") if n_steps > 1 else nullcontext() as bar:
        for steps, at_once in groups:
            results.update(_run_steps(steps, at_once, bar))
    return results.get("evaluate")


def _run_steps(steps: list[tuple[str, object]], at_once: int, bar) -> dict[str, object]:
    """Run named steps, ``at_once`` of them at a time; returns each one's result by name.

    A failed step lets the running ones finish, starts no new one, and is raised (the first
    failure, with the others logged)."""
    def done(name: str) -> None:
        if bar is not None:
            bar.update(1)
        log.debug("[stages] %s done", name)

    results: dict[str, object] = {}
    if at_once <= 1 or len(steps) == 1:
        for name, step in steps:
            results[name] = step()
            done(name)
        return results
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    waiting, running, errors = list(steps), {}, []
    with ThreadPoolExecutor(max_workers=min(at_once, len(steps)), thread_name_prefix="oppu-stage") as pool:
        while running or (waiting and not errors):
            while waiting and not errors and len(running) < at_once:  # a step starts only while none failed
                name, step = waiting.pop(0)
                running[pool.submit(step)] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                if future.exception() is not None:
                    errors.append((name, future.exception()))
                else:
                    results[name] = future.result()
                    done(name)
    for name, _ in waiting:
        log.warning("[stages] %s not started: %s failed", name, errors[0][0])
    for name, error in errors[1:]:
        log.error("[stages] %s failed too: %s", name, error)
    if errors:
        raise errors[0][1]
    return results


def _write_profiles(cfg: RunConfig) -> None:
    from oppu.data.dataset import read_dataset
    from oppu.profiles import run_profiles

    run_profiles(cfg, read_dataset(cfg.data_uri).users, log.info)


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
