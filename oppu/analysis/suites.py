"""The registry of analysis suites: name -> how to run it, and ``run_suites`` for the command."""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass

from oppu.analysis.report import SUITE_ORDER, save_suite
from oppu.errors import ConfigError
from oppu.run_config import RunConfig

log = logging.getLogger(__name__)

MODULES = {
    "behaviour-shift": "oppu.analysis.behaviour_shift",
    "activity": "oppu.analysis.activity",
    "k-sweep": "oppu.analysis.k_sweep",
    "history-format": "oppu.analysis.history_format",
    "peft-methods": "oppu.analysis.peft_methods",
    "adapter-similarity": "oppu.analysis.adapter_similarity",
    "training-cost": "oppu.analysis.training_cost",
}
assert tuple(MODULES) == SUITE_ORDER


@dataclass
class SuiteOptions:
    """Sizes of the suites that train (defaults keep ``--suite all`` on a quickstart run within
    30 minutes on 2 CPU cores)."""

    users: int = 4  # test users of behaviour-shift, k-sweep, history-format, peft-methods
    buckets: int = 3  # activity: history-length buckets ...
    per_bucket: int = 3  # ... and users per bucket
    activity_base_samples: int = 600  # activity: cap on the held-out base's training samples
    activity_fresh_pretrained: bool = True  # activity: tiny default pretrained without the buckets too
    keep_fraction: float = 0.5  # behaviour-shift: share of the history kept (the least relevant)
    embedding_model: str | None = None  # behaviour-shift: HF id/path; None: the lexical fallback
    variant: str = "oppu"  # adapter-similarity: which adapters


def suite_names(requested: str) -> list[str]:
    if requested == "all":
        return list(MODULES)
    if requested not in MODULES:
        raise ConfigError(f"unknown suite {requested!r}: use one of {list(MODULES)} or 'all'")
    return [requested]


def run_suite(name: str, cfg: RunConfig, options: SuiteOptions) -> dict[str, str]:
    """Run one suite on the run ``cfg`` and write its JSON, PNG and report section."""
    module = importlib.import_module(MODULES[name])
    kwargs = {
        "behaviour-shift": {"n_users": options.users, "keep_fraction": options.keep_fraction,
                            "embedding_model": options.embedding_model},
        "activity": {"n_buckets": options.buckets, "per_bucket": options.per_bucket,
                     "base_max_samples": options.activity_base_samples,
                     "fresh_pretrained": options.activity_fresh_pretrained},
        "k-sweep": {"n_users": options.users},
        "history-format": {"n_users": options.users},
        "peft-methods": {"n_users": options.users},
        "adapter-similarity": {"variant": options.variant},
        "training-cost": {},
    }[name]
    started = time.perf_counter()
    log.info(f"[analyze] {name} on {cfg.run_dir}")
    result, figure = module.run(cfg, **kwargs)
    written = save_suite(cfg.run_dir, result, figure)
    log.info("[analyze] %s done in %.0fs: %s, %s", name, time.perf_counter() - started, written["json"],
             written["png"])
    return written
