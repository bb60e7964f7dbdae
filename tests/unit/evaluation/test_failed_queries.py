"""Evaluation reports failed queries (issue #15): ``metrics.json`` lists them by method, and more
than ``eval.max_failed_queries`` fail the stage once everything is written."""

from __future__ import annotations

import json

import pytest

from oppu.errors import StageFailed
from oppu.evaluation.runner import check_failed_queries, write_results
from oppu.tasks import get_task


def _config(tmp_path, *overrides):
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    return load_config(RunConfig, None, [f"run_dir={tmp_path}", "task=LaMP-3", *overrides])


def _write(cfg, failed):
    task = get_task("LaMP-3")
    golds = {"q1": "1", "q2": "5", "q3": "3"}
    predictions = {"non-personalized": {"q1": "1", "q2": "5", "q3": "3"}, "oppu": {"q1": "1", "q2": "", "q3": ""}}
    raw = {m: dict(p) for m, p in predictions.items()}
    return write_results(cfg, task, golds, predictions, raw, failed, 2)


FAILED = {"non-personalized": {}, "oppu": {"q3": "AdapterNotFound: no adapter for u2", "q2": "AdapterNotFound: x"}}


def test_metrics_json_lists_failed_queries_by_method_and_the_stage_fails(tmp_path):
    cfg = _config(tmp_path)
    metrics = _write(cfg, FAILED)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["failed_queries"] == {"oppu": {"count": 2, "ids": ["q2", "q3"], "first_error": "AdapterNotFound: x"}}
    assert written["errors"] == {"oppu": 2} and metrics["failed_queries"] == written["failed_queries"]
    with pytest.raises(StageFailed) as raised:
        check_failed_queries(cfg, metrics)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("evaluate: 2 queries could not be answered (oppu: 2 (q2, q3; first error: "
                              "AdapterNotFound: x)), more than eval.max_failed_queries=0 allows")
    assert str(tmp_path / "metrics.json") in message


@pytest.mark.parametrize("allowed", ["2", "-1"])
def test_the_threshold_allows_that_many(tmp_path, allowed):
    cfg = _config(tmp_path, f"eval.max_failed_queries={allowed}")
    check_failed_queries(cfg, _write(cfg, FAILED))


def test_no_failed_queries_pass(tmp_path):
    cfg = _config(tmp_path)
    metrics = _write(cfg, {"non-personalized": {}, "oppu": {}})
    assert metrics["failed_queries"] == {} and metrics["errors"] == {}
    check_failed_queries(cfg, metrics)


def test_failures_are_counted_over_all_methods(tmp_path):
    cfg = _config(tmp_path, "eval.max_failed_queries=2")
    failed = {"non-personalized": {"q1": "RuntimeError: actor could not start"}, "oppu": FAILED["oppu"]}
    with pytest.raises(StageFailed, match=r"evaluate: 3 queries .*non-personalized: 1 .*oppu: 2"):
        check_failed_queries(cfg, _write(cfg, failed))
