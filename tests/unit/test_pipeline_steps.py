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
