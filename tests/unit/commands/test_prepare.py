from __future__ import annotations

import json

import pytest

from oppu.cli import main
from oppu.data.dataset import read_dataset
from oppu.tasks import get_task
from tests.unit.data.fixtures.lamp_files import (
    M1,
    M2,
    M3,
    movie_questions,
    review_questions,
    write_lamp,
    write_movies,
)


def _prepare(questions, outputs, out, *extra: str, task: str = "LaMP-2M") -> int:
    return main(["prepare", "--task", task, "--questions", str(questions), "--outputs", str(outputs),
                 "--out", str(out), *extra])


def test_prepare_writes_data_set_with_test_users_and_summary(tmp_path, capsys):
    questions, outputs = write_movies(tmp_path)
    assert _prepare(questions, outputs, tmp_path / "ds", "--n-test", "1") == 0

    dataset = read_dataset(tmp_path / "ds")
    assert [(u.user_id, u.role) for u in dataset.users] == [("u1", "test"), ("u2", "base"),
                                                           ("u3", "base")]
    assert dataset.meta["sources"] == {"format": "lamp", "questions": str(questions),
                                       "outputs": str(outputs)}
    report = json.loads((tmp_path / "ds" / "prepare_report.json").read_text())
    assert report == {"n_errors": 0, "dropped_users": [], "errors": []}
    printed = capsys.readouterr().out
    assert "3 users (1 test, 2 base), 7 history items, 4 queries" in printed
    assert str(tmp_path / "ds" / "users.parquet") in printed


def test_prepare_lamp3_without_user_ids(tmp_path):
    questions, golds = review_questions()
    paths = write_lamp(tmp_path, questions, golds, "LaMP_3")
    assert _prepare(*paths, tmp_path / "ds", "--n-test", "1", task="lamp-3") == 0
    assert [(u.user_id, u.role) for u in read_dataset(tmp_path / "ds").users] == [("7", "test"),
                                                                                  ("8", "base")]


@pytest.mark.parametrize(("break_it", "expected"), [
    (lambda q, g, d: q[0]["profile"][0].pop("tag"),
     "file='{d}/questions.json', user='u1', record='101', field='profile[0].tag'"),
    (lambda q, g, d: q[1].update(input=7),
     "file='{d}/questions.json', user='u2', record='201', field='input'"),
    (lambda q, g, d: q[3].update(id="102"),
     "file='{d}/questions.json', user='u3', record='102', field='id'"),
    (lambda q, g, d: g.pop("301"),
     "file='{d}/questions.json', user='u3', record='301', field='output'"),
    (lambda q, g, d: g.update({"102": ["sci-fi"]}),
     "file='{d}/outputs.json', record='102', field='output'"),
])
def test_any_bad_record_exits_2_naming_file_record_and_field(tmp_path, capsys, break_it, expected):
    questions, golds = movie_questions()
    break_it(questions, golds, tmp_path)
    paths = write_lamp(tmp_path, questions, golds, "LaMP_2M")

    assert _prepare(*paths, tmp_path / "ds", "--n-test", "1") == 2
    assert expected.format(d=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_malformed_json_exits_2(tmp_path, capsys):
    questions, outputs = write_movies(tmp_path)
    questions.write_text('[{"id": "1",,}]')
    assert _prepare(questions, outputs, tmp_path / "ds") == 2
    err = capsys.readouterr().err
    assert "malformed JSON at line 1 column 13" in err and str(questions) in err


def test_every_error_is_listed_one_per_line(tmp_path, capsys):
    questions, golds = movie_questions()
    questions[0]["profile"][0].pop("tag")
    questions[3]["input"] = None
    assert _prepare(*write_lamp(tmp_path, questions, golds, "LaMP_2M"), tmp_path / "ds") == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(error_lines) == 2
    assert "record='101'" in error_lines[0] and "record='301'" in error_lines[1]


def test_skip_bad_users_keeps_the_good_ones_and_reports_the_rest(tmp_path, capsys):
    questions, golds = movie_questions()
    questions[3]["profile"][1]["date"] = "not a date"  # u3
    golds["201"] = {"tag": "fantasy"}  # u2
    paths = write_lamp(tmp_path, questions, golds, "LaMP_2M")

    assert _prepare(*paths, tmp_path / "ds", "--n-test", "0", "--skip-bad-users") == 0
    assert [u.user_id for u in read_dataset(tmp_path / "ds").users] == ["u1"]
    report = json.loads((tmp_path / "ds" / "prepare_report.json").read_text())
    assert report["dropped_users"] == ["u2", "u3"]
    assert {(e["record"], e["field"]) for e in report["errors"]} >= {("301", "profile[1].date"),
                                                                      ("201", "output")}
    assert "dropped 2 user(s) with bad records: u2, u3" in capsys.readouterr().err


def test_too_many_test_users_is_a_config_error(tmp_path, capsys):
    assert _prepare(*write_movies(tmp_path), tmp_path / "ds", "--n-test", "3") == 2
    assert "base task adaptation needs at least one non-test user" in capsys.readouterr().err


def test_oppu_format_with_others(tmp_path, capsys):
    movie_input = get_task("LaMP-2M").lamp_input({"description": "robots"})
    top = [{"user_id": "7", "profile": [M1, M2, M3],
            "query": [{"id": "q7", "input": movie_input, "gold": "sci-fi"}]}]
    others = [{"user_id": "8", "profile": [M2],
               "query": [{"id": "q8", "input": movie_input, "gold": "action"}]},
              {"user_id": "9", "profile": [M1]}]
    (tmp_path / "top.json").write_text(json.dumps(top))
    (tmp_path / "others.json").write_text(json.dumps(others))

    status = main(["prepare", "--task", "LaMP_2M", "--format", "oppu", "--questions",
                   str(tmp_path / "top.json"), "--others", str(tmp_path / "others.json"),
                   "--out", f"file://{tmp_path}/ds"])
    assert status == 0
    dataset = read_dataset(f"file://{tmp_path}/ds")
    assert [(u.user_id, u.role, len(u.history), len(u.queries)) for u in dataset.users] == [
        ("7", "test", 3, 1), ("8", "base", 1, 1), ("9", "base", 1, 0)]
    assert dataset.user("7").queries[0].visible_history == 3
    assert "3 users (1 test, 2 base)" in capsys.readouterr().out


def test_oppu_format_refuses_lamp_only_options(tmp_path, capsys):
    (tmp_path / "top.json").write_text("[]")
    status = main(["prepare", "--task", "LaMP-2M", "--format", "oppu", "--questions",
                   str(tmp_path / "top.json"), "--n-test", "5", "--out", str(tmp_path / "ds")])
    assert status == 2
    assert "--n-test" in capsys.readouterr().err
