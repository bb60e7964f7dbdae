"""``bench/rating_shift_rules.py`` on a small synthetic LaMP-3 set: the rules' MAE beside the references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _data(tmp_path: Path, task: str) -> Path:
    out = tmp_path / task
    done = _run("bench/table1_real.py", "--task", task, "--seed", "4", "--users", "60", "--n-test", "12",
                "--out", str(out), "--stages", "data")
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "data"


def test_the_history_shift_rule_beats_copying_the_retrieved_score_and_other_tasks_are_refused(tmp_path):
    done = _run("bench/rating_shift_rules.py", "--data", str(_data(tmp_path, "LaMP-3")))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    mae = report["MAE"]
    assert report["queries"] == 60
    assert set(mae) == {"copy_retrieved_score", "one_retrieved_shift", "history_median_shift",
                        "reference_population", "reference_bayes"}
    assert all(0.0 <= value <= 4.0 for value in mae.values())
    # The user's own shift, read from their history, is what the generator planted: near Bayes.
    assert mae["history_median_shift"] < mae["copy_retrieved_score"]
    assert abs(mae["history_median_shift"] - mae["reference_bayes"]) < 0.25

    refused = _run("bench/rating_shift_rules.py", "--data", str(_data(tmp_path, "LaMP-2M")))
    assert refused.returncode != 0 and "a LaMP-2M data set" in refused.stderr
