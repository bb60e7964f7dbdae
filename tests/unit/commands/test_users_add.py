"""``oppu users add``: a user's history into a prepared run, validated as ``oppu prepare`` validates."""

from __future__ import annotations

import json

import pytest

from oppu.cli import main
from oppu.data.dataset import read_dataset
from oppu.erasure import add_tombstone
from tests.unit.data.fixtures.lamp_files import M1, M2, item, write_movies

NEW = [item("n2", "2022-02-02", description="a heist", tag="action"),
       item("n1", "2022-01-01", description="a sad clown", tag="dark comedy")]


@pytest.fixture
def run(tmp_path):
    questions, outputs = write_movies(tmp_path)
    run = tmp_path / "run"
    assert main(["prepare", "--task", "LaMP-2M", "--questions", str(questions), "--outputs", str(outputs),
                 "--n-test", "1", "--out", str(run / "data")]) == 0
    return run


def _add(run, user: str, history, tmp_path, name: str = "history.json") -> int:
    path = tmp_path / name
    path.write_text(json.dumps(history))
    return main(["users", "add", "--run", str(run), "--user", user, "--history", str(path)])


def test_a_new_user_joins_as_a_test_user_with_the_counts_updated(run, tmp_path, capsys):
    before = read_dataset(run / "data")
    assert _add(run, "newbie", NEW, tmp_path) == 0
    after = read_dataset(run / "data")
    user = after.user("newbie")
    assert user.role == "test" and user.queries == []
    assert [i.id for i in user.history] == ["n1", "n2"]  # sorted by date
    assert user.history[0].fields == {"description": "a sad clown", "tag": "dark comedy"}
    assert [u.user_id for u in after.users] == [u.user_id for u in before.users] + ["newbie"]
    assert after.users[:-1] == before.users  # nobody else changed
    assert after.meta["n_users"] == before.meta["n_users"] + 1
    assert after.meta["n_test_users"] == before.meta["n_test_users"] + 1
    assert after.meta["n_history_items"] == before.meta["n_history_items"] + 2
    assert "2 history item(s) added" in capsys.readouterr().out
    assert not list((run / "data").glob("*.tmp"))


def test_an_existing_users_history_is_merged_by_item_id(run, tmp_path, capsys):
    before = read_dataset(run / "data").user("u1")  # history m2 m1 m3, two queries
    assert _add(run, "u1", [M1, M2, *NEW], tmp_path) == 0  # m1 and m2 already there
    after = read_dataset(run / "data").user("u1")
    assert [i.id for i in after.history] == [i.id for i in before.history] + ["n1", "n2"]
    assert after.queries == before.queries and after.role == before.role
    assert "2 history item(s) added, 2 already there" in capsys.readouterr().out
    assert _add(run, "u1", NEW, tmp_path) == 0  # again: nothing new, nothing written
    assert len(read_dataset(run / "data").user("u1").history) == len(after.history)

    changed = {**M1, "tag": "action"}  # same id, other content: refused, naming the item
    assert _add(run, "u1", [changed], tmp_path) == 2
    err = capsys.readouterr().err
    assert "record='m1'" in err and "user='u1'" in err and "history.json" in err


@pytest.mark.parametrize(("history", "expected"), [
    ([NEW[0], {**NEW[1], "tag": 7}], "record='n1', field='profile[1].tag'"),
    ([{k: v for k, v in NEW[0].items() if k != "description"}], "record='n2', field='profile[0].description'"),
    ([{**NEW[0], "date": "soon"}], "record='n2', field='profile[0].date'"),
    ([{"description": "x", "tag": "comedy"}], "record='#0', field='profile[0].id'"),
    ([NEW[0], "text"], "record='#1', field='profile[1]'"),
    ([{"id": "q1", "input": "a query", "profile": []}], "record='q1', field='profile[0].input'"),
])
def test_a_bad_record_exits_2_naming_record_and_field_and_writes_nothing(run, tmp_path, capsys, history,
                                                                         expected):
    before = (run / "data" / "users.parquet").read_bytes()
    assert _add(run, "newbie", history, tmp_path) == 2
    err = capsys.readouterr().err
    assert expected in err and f"file='{tmp_path / 'history.json'}'" in err and "user='newbie'" in err
    assert (run / "data" / "users.parquet").read_bytes() == before


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "malformed JSON"),
    (json.dumps({"id": "q", "profile": []}), "got an object with a 'profile'"),
    (json.dumps([]), "no history items"),
])
def test_a_bad_file_exits_2(run, tmp_path, capsys, content, expected):
    path = tmp_path / "history.json"
    path.write_text(content)
    assert main(["users", "add", "--run", str(run), "--user", "newbie", "--history", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_an_erased_user_is_refused_until_restored(run, tmp_path, capsys):
    add_tombstone(str(run / "adapters"), "gone")
    assert _add(run, "gone", NEW, tmp_path) == 2
    err = capsys.readouterr().err
    assert "'gone' was erased" in err and "oppu users restore" in err
    with pytest.raises(KeyError):
        read_dataset(run / "data").user("gone")
    assert main(["users", "restore", "--run", str(run), "--user", "gone"]) == 0
    assert _add(run, "gone", NEW, tmp_path) == 0


def test_bad_arguments_exit_2(run, tmp_path, capsys):
    assert _add(run, "bad/id", NEW, tmp_path) == 2
    assert "--user" in capsys.readouterr().err
    assert main(["users", "add", "--run", str(run), "--user", "u9", "--history",
                 str(tmp_path / "missing.json")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["users", "train", "--run", str(run), "--user", "nobody",
                 "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_train_refuses_users_it_would_not_train_before_ray_starts(run, tmp_path, capsys):
    (run / "config.yaml").write_text(f"task: LaMP-2M\nrun_dir: {tmp_path / 'elsewhere'}\n")
    assert main(["users", "train", "--run", str(run), "--user", "nobody"]) == 2
    assert "'nobody' is not in the data set" in capsys.readouterr().err
    assert main(["users", "train", "--run", str(run), "--user", "u1", "--user", "u2"]) == 2
    assert "'u2' is a base user" in capsys.readouterr().err
    add_tombstone(str(run / "adapters"), "u1")
    assert main(["users", "train", "--run", str(run), "--user", "u1"]) == 2
    assert "oppu users restore" in capsys.readouterr().err
