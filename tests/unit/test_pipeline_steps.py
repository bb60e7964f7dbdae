"""How ``oppu.pipeline`` runs the steps of a stage: at once where the config says, failures loud."""

from __future__ import annotations

import threading
import time

import pytest

from oppu.pipeline import _run_steps


def test_steps_run_at_once_and_return_by_name():
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three steps run together

    def step(value):
        def run():
            barrier.wait()
            return value
        return run

    results = _run_steps([(f"s{i}", step(i)) for i in range(3)], at_once=3, bar=None)
    assert results == {"s0": 0, "s1": 1, "s2": 2}


def test_steps_in_turn_when_one_at_a_time():
    order = []
    steps = [(name, lambda name=name: order.append(name) or name) for name in ("a", "b", "c")]
    assert _run_steps(steps, at_once=1, bar=None) == {"a": "a", "b": "b", "c": "c"}
    assert order == ["a", "b", "c"]


def test_a_failed_step_is_raised_after_the_running_ones_finish_and_starts_no_more(caplog):
    finished, started = [], []

    def slow():
        started.append("slow")
        time.sleep(0.3)
        finished.append("slow")

    def broken():
        started.append("broken")
        raise RuntimeError("base rag-k2 broke")

    def later():
        started.append("later")

    with pytest.raises(RuntimeError, match="rag-k2 broke"):
        _run_steps([("slow", slow), ("broken", broken), ("later", later)], at_once=2, bar=None)
    assert finished == ["slow"]  # the running step was not abandoned
    assert "later" not in started
    assert "later not started" in caplog.text


def test_progress_counts_only_finished_steps():
    class Bar:
        done = 0

        def update(self, n):
            self.done += n

    bar = Bar()

    def broken():
        raise ValueError("x")

    with pytest.raises(ValueError):
        _run_steps([("ok", lambda: 1), ("bad", broken)], at_once=2, bar=bar)
    assert bar.done == 1


@pytest.mark.parametrize(("parallel", "expected"), [
    (1, [("adapt_bases", ("plain", "rag-k1", "profile"))]),
    (2, [("profiles",), ("adapt_base", "plain"), ("adapt_base", "rag-k1"), ("adapt_base", "profile")]),
])
def test_base_flavours_train_in_one_run_unless_parallel(monkeypatch, tmp_path, parallel, expected):
    """``base.parallel_flavours`` 1: every flavour in one ``adapt_bases`` call (one Ray Train run);
    more: a run per flavour, the profiles written once before them."""
    from oppu import pipeline, preflight
    from oppu.config import load_config
    from oppu.run_config import RunConfig
    from oppu.training import base

    calls = []
    monkeypatch.setattr(preflight, "check_inputs", lambda cfg, stages: None)
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: None)
    monkeypatch.setattr(pipeline, "ensure_pretrained", lambda cfg: None)
    monkeypatch.setattr(pipeline, "_write_profiles", lambda cfg: calls.append(("profiles",)))
    monkeypatch.setattr(base, "adapt_bases", lambda cfg, flavours, log: calls.append(("adapt_bases", tuple(flavours))))
    monkeypatch.setattr(base, "adapt_base", lambda cfg, flavour, log: calls.append(("adapt_base", flavour)))
    cfg = load_config(RunConfig, None, [f"run_dir={tmp_path}", "base.flavours=[plain,rag-k1,profile]",
                                        f"base.parallel_flavours={parallel}"])
    pipeline.run_stages(cfg, ["base"])
    assert sorted(calls) == sorted(expected) and calls[0] == expected[0]


@pytest.mark.parametrize("recorded, expected", [
    ("127.0.0.1:6379", {"address": "127.0.0.1:6379"}),  # the cluster `ray start` made: joined as it is
    (None, {"num_cpus": 2, "include_dashboard": False}),  # none: a local instance of ray.num_cpus
])
def test_ray_joins_the_cluster_ray_start_made_else_starts_a_local_one(monkeypatch, tmp_path, recorded, expected):
    """After ``ray start --head``, ``oppu train-base`` and the other stage commands join that cluster
    as ``ray.init()`` finds it (``ray_current_cluster`` under ``$RAY_TMPDIR/ray``); ``ray.init``
    refuses ``num_cpus`` when it joins one, so it is passed only to a local instance (README,
    "Running the stages as Ray jobs")."""
    import ray
    import ray.data

    from oppu import logs, pipeline
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    if recorded:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(recorded)
    for name in ("quiet_ray_terminal", "filter_native_stderr"):
        monkeypatch.setattr(logs, name, lambda: None)
    monkeypatch.setattr(logs, "worker_env", lambda: {})
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray.data.DataContext, "get_current", lambda: type("Context", (), {})())
    pipeline.init_ray(load_config(RunConfig, None, [f"run_dir={tmp_path}", "ray.num_cpus=2"]))
    (kwargs,) = calls
    assert {k: kwargs.get(k) for k in expected} == expected
    assert ("num_cpus" in kwargs) == (recorded is None), kwargs
