"""``oppu score`` end to end through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from oppu.cli import main


def write_outputs(path, task, outputs):
    path.write_text(json.dumps({"task": task, "golds": [{"id": i, "output": o} for i, o in outputs]}))
    return str(path)


def test_score_prints_one_json_object_with_lamps_keys(tmp_path, capsys):
    golds = write_outputs(tmp_path / "g.json", "LaMP_3", [("1", "1"), ("2", "5"), ("3", "3")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_3", [("3", "3"), ("1", "2"), ("2", "five")])
    assert main(["score", "--task", "LaMP-3", "--golds", golds, "--preds", preds]) == 0
    scores = json.loads(capsys.readouterr().out)
    # Errors 0, 1 and 4 ("five" is unparseable, the farthest rating from gold 5 is 1).
    assert scores == pytest.approx({"MAE": 5 / 3, "RMSE": (17 / 3) ** 0.5})


def test_score_generation_task(tmp_path, capsys):
    golds = write_outputs(tmp_path / "g.json", "LaMP_4", [("a", "Stocks rally")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_4", [("a", "stocks rally today")])
    assert main(["score", "--task", "lamp_4", "--golds", golds, "--preds", preds]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx({"rouge-1": 0.8, "rouge-L": 0.8})


def test_missing_prediction_exits_2_naming_file_and_id(tmp_path, capsys):
    golds = write_outputs(tmp_path / "g.json", "LaMP_2M", [("q1", "comedy"), ("q2", "sci-fi")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_2M", [("q1", "comedy")])
    assert main(["score", "--task", "LaMP-2M", "--golds", golds, "--preds", preds]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "p.json" in captured.err and "'q2'" in captured.err


def test_unreadable_file_and_unknown_task_exit_2(tmp_path, capsys):
    golds = write_outputs(tmp_path / "g.json", "LaMP_2M", [("q1", "comedy")])
    missing = str(tmp_path / "nowhere.json")
    assert main(["score", "--task", "LaMP-2M", "--golds", golds, "--preds", missing]) == 2
    assert "nowhere.json" in capsys.readouterr().err
    assert main(["score", "--task", "LaMP-6", "--golds", golds, "--preds", golds]) == 2
    assert "private" in capsys.readouterr().err
