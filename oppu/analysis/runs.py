"""Sub-runs of an analysis: a run config pointing at ``DIR/analysis/<suite>/...`` that reuses the
main run's task-adapted bases (and, where the history is unchanged, its adapter store)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from oppu import fsutil
from oppu.data.records import UserData
from oppu.errors import ConfigError
from oppu.run_config import RunConfig


def load_run_config(run_dir: str, config: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The config of the run in ``run_dir``: its ``config.yaml`` (quickstart and jobs write one),
    else the packaged quickstart config, with ``run_dir`` set and ``overrides`` on top."""
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS

    if config is None:
        saved = fsutil.join(run_dir, "config.yaml")
        config = saved if fsutil.exists(saved) else str(PACKAGED_CONFIGS / "quickstart.yaml")
    if fsutil.is_remote(str(config)):
        raise ConfigError(f"--config must be a local file, got {config}")
    if not fsutil.exists(fsutil.join(run_dir, "data", "dataset.json")):
        raise ConfigError(f"{run_dir} is not a run directory: it has no data/dataset.json (run "
                          "`oppu quickstart --out DIR` or the pipeline first)")
    return load_config(RunConfig, config, [f"run_dir={run_dir}", *overrides])


def analysis_dir(cfg: RunConfig) -> str:
    return fsutil.join(cfg.run_dir, "analysis")


def sub_run(cfg: RunConfig, *parts: str, data: str | None = None, store: str | None = None,
            link_bases: Sequence[str] = ("plain", "rag"), link_pretrained: bool = True,
            **sections) -> RunConfig:
    """A copy of ``cfg`` whose run dir is ``DIR/analysis/<parts...>``.

    ``data``, ``store`` and the bases default to the sub run's own; the main run's bases named in
    ``link_bases`` (and the tiny pretrained model) are made visible in the sub run, so its
    adapters are keyed under the same base fingerprint. ``sections`` replace whole config
    sections (``users=..., eval=...``).
    """
    run_dir = fsutil.join(analysis_dir(cfg), *parts)
    sub = dataclasses.replace(cfg, run_dir=run_dir, data=data, store=store, bases=None, **sections)
    for flavour in link_bases:
        _link(cfg.base_uri(flavour), sub.base_uri(flavour))
    if cfg.model == "tiny" and link_pretrained:
        _link(cfg.pretrained_uri, sub.pretrained_uri)
    return sub


def _link(source: str, target: str) -> None:
    """Make ``target`` show the finished directory ``source``: a symlink locally, a copy remotely."""
    if not fsutil.exists(source) or fsutil.exists(target):
        return
    if fsutil.is_remote(source) or fsutil.is_remote(target):
        fs, source_path = fsutil.filesystem(source)
        _, target_path = fsutil.filesystem(target)
        fs.copy(source_path, target_path, recursive=True)
        return
    target_path = fsutil.local_path(target)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    target_path.symlink_to(Path(fsutil.local_path(source)).resolve(), target_is_directory=True)


def with_users(cfg: RunConfig, **changes) -> RunConfig:
    """``cfg`` with fields of its ``users`` section changed."""
    return dataclasses.replace(cfg, users=dataclasses.replace(cfg.users, **changes))


def with_eval(cfg: RunConfig, methods: Sequence[str]) -> RunConfig:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, methods=list(methods)))


def write_sub_dataset(sub: RunConfig, task_name: str, users: list[UserData], meta: dict) -> str:
    """Write a derived data set into the sub run's data dir (replacing an older one)."""
    from oppu.data.dataset import write_dataset

    write_dataset(sub.data_uri, task_name, users, {"derived_by": "oppu analyze", **meta})
    return sub.data_uri


def pick_users(users: Sequence[UserData], n: int) -> list[UserData]:
    """``n`` users spread over ``users`` sorted by history length (most active first), so a
    small subset still covers the range of activity."""
    ordered = sorted(users, key=lambda u: (-len(u.history), u.user_id))
    if n >= len(ordered):
        return ordered
    step = len(ordered) / n
    return [ordered[int(i * step)] for i in range(n)]


def train_and_evaluate(sub: RunConfig, variants: Sequence[str], methods: Sequence[str]) -> dict:
    """The main pipeline's users and evaluate stages on the sub run; returns its metrics."""
    from oppu.pipeline import run_stages

    stages = ["users", "evaluate"] if variants else ["evaluate"]
    return run_stages(with_eval(with_users(sub, variants=list(variants)), methods), stages)


def scores_by_group(sub: RunConfig, methods: Sequence[str], group_of: dict[str, str]) -> dict[str, dict]:
    """{group: {method: LaMP scores}} from the sub run's predictions, users grouped by ``group_of``."""
    from oppu.data.dataset import read_dataset

    dataset = read_dataset(sub.data_uri)
    task = dataset.task
    query_group = {q.id: group_of[u.user_id] for u in dataset.test_users() for q in u.queries
                   if q.gold is not None and u.user_id in group_of}
    golds = {q.id: q.gold for u in dataset.test_users() for q in u.queries if q.id in query_group}
    scores: dict[str, dict] = {}
    for method in methods:
        predicted = {row["id"]: row["output"] for row in
                     fsutil.read_json(fsutil.join(sub.run_dir, "predictions", f"{method}.json"))["golds"]}
        for group in sorted(set(query_group.values())):
            ids = sorted(i for i, g in query_group.items() if g == group)
            scores.setdefault(group, {})[method] = task.score([golds[i] for i in ids],
                                                              [predicted.get(i, "") for i in ids])
    return scores
