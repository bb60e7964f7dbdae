"""``bench/table1_real.py`` end to end on the CPU: the shipped ``table1-real.yaml`` (all six bases,
six personal variants, 13 methods) with the tiny model and CPU settings, as a user on a new seed runs it.

On the GPU the same command runs with the real model (README, "Table 1 at paper scale"); here it is
the plumbing under test: every column evaluated, the record's shape, and a second call resuming
instead of training again. The tiny model at this size does not learn the task, so no quality is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TABLE1_METHODS = ["non-personalized", "random-history", "rag-k1", "rag-k2", "rag-k4", "pag", "pag+rag-k1",
                  "oppu", "rag-k1+oppu", "rag-k2+oppu", "rag-k4+oppu", "pag+oppu", "pag+rag-k1+oppu"]
CPU = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
       "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=60",
       "base.use_gpu=false", "base.deepspeed=null", "base.optim.epochs=1", "base.optim.batch_size=16",
       "base.optim.max_length=256", "users.num_gpus_per_actor=0", "users.actors=1", "users.num_cpus_per_actor=1",
       "users.optim.epochs=1", "eval.num_gpus_per_actor=0", "eval.actors=1", "eval.num_cpus_per_actor=1",
       "eval.users_per_batch=4", "profiles.writer=statistical", "profiles.num_gpus=0", "ray.num_cpus=2"]


def run_table1(out: Path, results: Path, seed: int, stages: list[str], *extra: str) -> str:
    argv = [sys.executable, str(ROOT / "bench" / "table1_real.py"), "--task", "LaMP-2M", "--seed", str(seed),
            "--users", "24", "--n-test", "4", "--model", "tiny", "--out", str(out), "--results", str(results),
            "--stages", *stages, *extra]
    for override in CPU:
        argv += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)  # $OUT means the GPU machine's return folder to the script
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_the_whole_table_is_evaluated_recorded_and_resumed(tmp_path):
    out, results = tmp_path / "run", tmp_path / "table1_real.json"
    run_table1(out, results, seed=3, stages=["data", "base", "users", "evaluate"])

    record = json.loads(results.read_text())
    assert record["device"] == "cpu" and record["model"] == "tiny" and record["tuning_seeds"] == [0]
    (run,) = record["runs"]
    assert (run["task"], run["seed"]) == ("LaMP-2M", 3)
    assert "--seed 3" in run["command"] and run["command"] == record["command"]
    assert sorted(run["methods"]) == sorted(TABLE1_METHODS)
    for method, scores in run["methods"].items():
        assert set(scores) == {"accuracy", "f1"}, method
        assert all(0.0 <= value <= 1.0 for value in scores.values()), (method, scores)
    assert run["n_test_users"] == 4 and run["n_queries"] == 20
    assert run["errors"] == {}
    assert run["decoding"] == "labels" and "other_decoding" not in run  # the shipped config scores labels
    population, bayes = run["reference"]["population"], run["reference"]["bayes"]
    assert 0.0 < population["accuracy"] <= bayes["accuracy"] <= 1.0
    assert set(run["stage_seconds"]) == {"data", "base", "users", "evaluate"}
    assert run["device_seconds"] == pytest.approx(sum(run["stage_seconds"].values()), abs=0.2)
    flavours = {"base", "base-rag-k1", "base-rag-k2", "base-rag-k4", "base-profile", "base-profile+rag-k1"}
    assert flavours <= {p.name for p in out.iterdir()}

    # A second call (the next device call on the GPU) resumes: nothing is trained again, the data
    # is kept, and the seconds of the stages that did no work are not added.
    log = run_table1(out, results, seed=3, stages=["data", "base", "users"])
    assert "reusing the data" in log
    assert log.count("reusing ") >= 1 + len(flavours), log[-3000:]
    assert log.count("already have this adapter in the store: skipped without starting the actor pool") == 6
    assert "trained 0, skipped 4, failed 0" in log
    assert json.loads((out / "bench-stage-seconds.json").read_text())["data"] == pytest.approx(
        run["stage_seconds"]["data"], abs=0.05)

    # Evaluated again with greedy decoding beside the labels, on the same bases and adapters; the
    # comparison's seconds are its own, not the table's.
    run_table1(out, results, 3, ["evaluate"], "--compare-decoding")
    (again,) = json.loads(results.read_text())["runs"]
    other = again["other_decoding"]
    assert again["decoding"] == "labels" and other["decoding"] == "greedy"
    assert sorted(other["methods"]) == sorted(TABLE1_METHODS) and other["evaluate_seconds"] > 0
    assert again["device_seconds"] == pytest.approx(sum(again["stage_seconds"].values()), abs=0.2)
