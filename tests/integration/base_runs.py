"""Base-adaptation runs through ``adapt_bases`` on a local Ray, watched from inside the workers.

Shared by tests/integration/test_train_base_resume.py (CPU) and tests/gpu/test_base_gpu.py.
``watch_base_workers`` is a Ray worker setup hook; in the Ray Train workers it
- appends every ``ray.train.report`` to ``$OPPU_TEST_BASE_DIR/reports.jsonl`` (rank, pid, metrics,
  whether a checkpoint came with it);
- makes rank 0 die (``os._exit``, a lost worker) right after a report at a step named in
  ``$OPPU_TEST_BASE_DIR/fail-at-step``: one line per death, ``STEP`` (any flavour's) or
  ``FLAVOUR STEP``, matched by a checkpoint's report or by the report that follows a flavour's
  publication (its final step); the first line is taken, each line once;
- appends the learning rate and weight decay each ``torch.optim.AdamW`` step used to ``steps.jsonl``;
- saves the LoRA weights that rank 0 merges into the base to ``merged-adapter.pt``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASK = "LaMP-2M"
WATCH_DIR = "OPPU_TEST_BASE_DIR"
FAIL_AT = "fail-at-step"


def watch_base_workers() -> None:
    """Ray worker setup hook (see the module docstring); a no-op without ``$OPPU_TEST_BASE_DIR``."""
    watch = os.environ.get(WATCH_DIR)
    if not watch:
        return
    import peft.tuners.tuners_utils
    import ray.train
    import torch

    watch = Path(watch)
    tuner = peft.tuners.tuners_utils.BaseTuner
    report, step, merge = ray.train.report, torch.optim.AdamW.step, tuner.merge_and_unload
    if getattr(report, "watched", False):
        return

    def rank() -> int:
        return ray.train.get_context().get_world_rank()

    def append(name: str, record: dict) -> None:
        with open(watch / name, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "rank": rank(), **record}) + "\n")

    def watched_report(metrics, checkpoint=None, **kwargs):
        report(metrics, checkpoint=checkpoint, **kwargs)
        append("reports.jsonl", {"checkpoint": checkpoint is not None, **metrics})
        fail_at = watch / FAIL_AT
        if rank() != 0 or not (checkpoint is not None or metrics.get("published")) or not fail_at.exists():
            return
        first, *rest = fail_at.read_text().splitlines()
        *flavour, step = first.split()
        if metrics.get("step") == int(step) and flavour in ([], [metrics.get("flavour")]):
            if rest:
                fail_at.write_text("\n".join(rest))
            else:
                fail_at.unlink()
            time.sleep(3)  # Ray Train's controller collects the report before it sees the worker die
            os._exit(1)

    def watched_step(self, *args, **kwargs):
        append("steps.jsonl", {"lr": [g["lr"] for g in self.param_groups],
                               "weight_decay": [g["weight_decay"] for g in self.param_groups]})
        return step(self, *args, **kwargs)

    def watched_merge(self, *args, **kwargs):
        torch.save({n: p.detach().float().cpu().clone() for n, p in self.named_parameters() if "lora_" in n},
                   watch / "merged-adapter.pt")
        return merge(self, *args, **kwargs)

    watched_report.watched = True
    ray.train.report = watched_report
    torch.optim.AdamW.step = watched_step
    tuner.merge_and_unload = watched_merge


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """Prepared synthetic data and a tiny pretrained model (data dir, model dir), for a module."""
    return prepare_run(tmp_path_factory.mktemp("prepared"), hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=64, vocab_size=600, pretrain_steps=10)


def watched_ray(tmp_path_factory, **init):
    """A module fixture's body: a local Ray whose workers run ``watch_base_workers``; yields the
    directory they write to."""
    import ray

    watch = tmp_path_factory.mktemp("watch")
    ray.shutdown()
    # address="local": a fresh instance, never a cluster someone else started on this machine
    ray.init(address="local", include_dashboard=False, log_to_driver=True, **init, runtime_env={
        "worker_process_setup_hook": watch_base_workers,
        "env_vars": {WATCH_DIR: str(watch), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                     # workers import this module to run the hook
                     "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield watch
    ray.shutdown()


def prepare_run(out: Path, **tiny) -> tuple[Path, Path]:
    """Synthetic LaMP-2M data prepared under ``out/data`` (10 users, 4 of them test users) and a
    tiny model of ``TinyModelConfig(**tiny)`` pretrained on its base users' texts under
    ``out/pretrained``; returns (data dir, model dir)."""
    from oppu import cli
    from oppu.data.dataset import read_dataset
    from oppu.models import TinyModelConfig, build_tiny_base
    from oppu.training.samples import pretraining_corpus

    lamp = out / "lamp"
    assert cli.main(["synth", "--task", TASK, "--users", "10", "--seed", "5", "--n-test", "4",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", TASK, "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "4", "--out", str(out / "data")]) == 0
    dataset = read_dataset(out / "data")
    corpus = pretraining_corpus(dataset.task, dataset.base_users())
    return out / "data", build_tiny_base(corpus, out / "pretrained", TinyModelConfig(**tiny))


def base_config(run_dir: Path, data: Path, model: Path, *overrides: str):
    """A run config training the plain base of ``model`` on ``data`` into ``run_dir``."""
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    return load_config(RunConfig, None, [f"task={TASK}", f"run_dir={run_dir}", f"data={data}", f"model={model}",
                                         "base.flavours=[plain]", *overrides])


def run_base(cfg, watch: Path, fail_at_step: int | None = None) -> list[dict]:
    """``adapt_base`` for the plain flavour; returns rank 0's reports (``reports.jsonl``)."""
    return run_bases(cfg, watch, ["plain"], [] if fail_at_step is None else [str(fail_at_step)])


def run_bases(cfg, watch: Path, flavours: list[str], fail_at: list[str] = (), log=None) -> list[dict]:
    """``adapt_bases`` for ``flavours`` in one run, rank 0 dying at each of ``fail_at`` (lines of
    ``fail-at-step``, in order); returns rank 0's reports (``reports.jsonl``)."""
    from oppu.training.base import adapt_bases

    for name in ("reports.jsonl", "steps.jsonl", "merged-adapter.pt", FAIL_AT):
        (watch / name).unlink(missing_ok=True)
    if fail_at:
        (watch / FAIL_AT).write_text("\n".join(fail_at))
    adapt_bases(cfg, flavours, log=log or (lambda line: None))
    assert not (watch / FAIL_AT).exists(), f"rank 0 did not die at all of {fail_at}"
    return [r for r in read_jsonl(watch / "reports.jsonl") if r["rank"] == 0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def published_weights(base_dir: Path) -> dict:
    """The tensors of a published base's safetensors files, by name."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        weights |= load_file(path)
    return weights
