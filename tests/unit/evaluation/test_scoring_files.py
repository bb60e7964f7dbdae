"""Scoring by id and from LaMP outputs-format files."""

from __future__ import annotations

import json

import pytest

from oppu.errors import DataError
from oppu.evaluation.scoring import read_outputs_file, score_files, score_predictions


def write_outputs(path, task, outputs):
    path.write_text(json.dumps({"task": task, "golds": [{"id": i, "output": o} for i, o in outputs]}))
    return path


def test_score_predictions_matches_by_id_not_position():
    golds = {"a": "1", "b": "5"}
    preds = {"b": "5", "a": "1"}
    assert score_predictions("LaMP-3", golds, preds) == {"MAE": 0.0, "RMSE": 0.0}


def test_score_predictions_names_missing_and_extra_ids():
    with pytest.raises(DataError, match=r"without a prediction: 'b'.*not among the golds: 'z'"):
        score_predictions("LaMP-3", {"a": "1", "b": "2"}, {"a": "1", "z": "2"}, preds_file="p.json")


def test_score_files_accepts_underscore_task_names(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_2M", [("1", "comedy"), ("2", "sci-fi")])
    preds = write_outputs(tmp_path / "p.json", "LaMP-2M", [("2", "sci-fi"), ("1", "action")])
    scores = score_files("LaMP-2M", golds, preds)
    assert scores["accuracy"] == 0.5


def test_lamps_own_lamp_2_name_fits_both_lamp_2_tasks(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_2", [("1", "comedy")])
    assert read_outputs_file(golds, "LaMP-2M") == {"1": "comedy"}
    assert read_outputs_file(golds, "LaMP-2N") == {"1": "comedy"}
    with pytest.raises(DataError, match="LaMP-2 is ambiguous"):
        read_outputs_file(golds, "LaMP-3")


def test_score_files_refuses_a_file_of_another_task(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_3", [("1", "3")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_3", [("1", "3")])
    with pytest.raises(DataError, match="for LaMP-3, not LaMP-2M") as caught:
        score_files("LaMP-2M", golds, preds)
    assert caught.value.file == str(golds)


def test_bad_gold_rating_names_the_golds_file(tmp_path):
    golds = write_outputs(tmp_path / "g.json", "LaMP_3", [("1", "three")])
    preds = write_outputs(tmp_path / "p.json", "LaMP_3", [("1", "3")])
    with pytest.raises(DataError, match="three") as caught:
        score_files("LaMP-3", golds, preds)
    assert caught.value.file == str(golds)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"task": "LaMP_3"}', "expected a JSON object"),
    ('{"task": "LaMP_3", "golds": [{"id": "1"}]}', "needs an 'id' and an 'output'"),
    ('{"task": "LaMP_3", "golds": [{"id": "1", "output": ["3"]}]}', "output must be text"),
    ('{"task": "LaMP_3", "golds": [{"id": "1", "output": "3"}, {"id": "1", "output": "4"}]}', "duplicate id"),
    ('{"task": "LaMP_9", "golds": []}', "not a supported task"),
])
def test_malformed_outputs_files_are_data_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        read_outputs_file(path, "LaMP-3")
    assert caught.value.file == str(path)


def test_numeric_outputs_are_read_as_text(tmp_path):
    path = write_outputs(tmp_path / "g.json", "LaMP_3", [(7, 4)])
    assert read_outputs_file(path) == {"7": "4"}
