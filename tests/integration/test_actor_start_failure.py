"""A pool actor that cannot start (its base will not load) fails each batch it takes, once, with
that error by name: no actor restarts, no job-ending ``ActorDiedError`` (oppu.actor_pools.guard_start,
issue 20). The drivers are called directly here, past the job's input check (oppu.preflight),
which would have stopped a missing base before the pool started."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TASK = "LaMP-2M"
N_TEST = 4


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory) -> Path:
    """Prepared data, and a ``base`` whose config.json is there but no model loads from it."""
    from oppu import cli

    out = tmp_path_factory.mktemp("run")
    lamp = out / "lamp"
    assert cli.main(["synth", "--task", TASK, "--users", "8", "--seed", "3", "--n-test", str(N_TEST),
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", TASK, "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", str(N_TEST),
                     "--out", str(out / "data")]) == 0
    (out / "base").mkdir()
    (out / "base" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return out


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _config(run_dir: Path, *overrides: str):
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS
    from oppu.run_config import RunConfig

    return load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", [
        f"task={TASK}", f"run_dir={run_dir}", "base.flavours=[plain]", "users.variants=[oppu]",
        "users.actors=1", "users.users_per_batch=2", "eval.actors=1", "eval.users_per_batch=2",
        "eval.methods=[non-personalized,oppu]", *overrides])


def test_train_users_actor_that_cannot_start_fails_its_batches_by_name(broken_run, local_ray):
    from oppu.errors import StageFailed
    from oppu.training.users import train_personal_adapters
    from oppu.training.users_report import load_report

    lines: list[str] = []
    started = time.monotonic()
    # Every user failed: the stage fails (issue #15), after its report, naming them all.
    with pytest.raises(StageFailed, match=rf"train_users oppu: {N_TEST} of {N_TEST} users failed \(") as raised:
        train_personal_adapters(_config(broken_run), "oppu", log=lines.append)
    seconds = time.monotonic() - started
    report = load_report(str(broken_run), "oppu")
    results = report["users"]
    assert len(results) == N_TEST and all(r["status"] == "failed" for r in results), results
    assert all(r["user_id"] in str(raised.value) for r in results)
    for result in results:
        assert result["error"].startswith("PersonalTrainer could not start: ") and "\n" not in result["error"]
    assert "failed 4" in lines[-N_TEST - 1]  # the summary, then one FAILED line per user
    assert sum("FAILED user" in line for line in lines) == N_TEST
    assert report["failed"] == N_TEST and report["trained"] == 0
    assert seconds < 120, seconds


def test_evaluate_actor_that_cannot_start_fails_its_queries(broken_run, local_ray, caplog):
    from oppu.errors import StageFailed
    from oppu.evaluation.runner import evaluate

    caplog.set_level("INFO", logger="oppu")
    with pytest.raises(StageFailed, match=r"evaluate: \d+ queries could not be answered \(non-personalized: "):
        evaluate(_config(broken_run))
    metrics = json.loads((broken_run / "metrics.json").read_text())
    assert metrics["errors"] == {"non-personalized": metrics["n_queries"], "oppu": metrics["n_queries"]}
    assert {m: e["count"] for m, e in metrics["failed_queries"].items()} == metrics["errors"]
    caplog.clear()
    # With the threshold lifted the stage passes, and still reports them.
    metrics = evaluate(_config(broken_run, "eval.max_failed_queries=-1"))
    assert metrics["errors"] == {"non-personalized": metrics["n_queries"], "oppu": metrics["n_queries"]}
    failed = [r.getMessage() for r in caplog.records if "users failed: " in r.getMessage()]
    assert len(failed) == 1 and failed[0].startswith(f"[evaluate] {N_TEST} of {N_TEST} users failed: "), failed
    raw = (broken_run / "predictions" / "raw" / "oppu.json").read_text()
    assert raw.count('""') == metrics["n_queries"]
