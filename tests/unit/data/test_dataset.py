from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from oppu.data.dataset import (
    assign_roles,
    dataset_fingerprint,
    history_span,
    read_dataset,
    users_parquet_path,
    write_dataset,
)
from oppu.data.records import HistoryItem, Query, UserData
from oppu.errors import ConfigError, DataError


def _user(user_id: str, n_history: int, dated: bool = True) -> UserData:
    history = [HistoryItem(id=f"{user_id}-{i}", fields={"text": f"review {i}", "score": str(1 + i % 5)},
                           date=f"2020-01-{i + 1:02d}" if dated else None) for i in range(n_history)]
    queries = [Query(id=f"{user_id}-q", input="... review: new", gold="4", visible_history=n_history)]
    return UserData(user_id=user_id, role="base", history=history, queries=queries)


def test_assign_roles_picks_longest_histories_ties_by_user_id():
    users = [_user("b", 3), _user("c", 5), _user("a", 3), _user("d", 1)]
    roles = {u.user_id: u.role for u in assign_roles(users, 2)}
    assert roles == {"c": "test", "a": "test", "b": "base", "d": "base"}
    assert [u.user_id for u in assign_roles(users, 2)] == ["b", "c", "a", "d"]
    assert [u.role for u in users] == ["base"] * 4  # the input is not modified


@pytest.mark.parametrize("n_test", [4, 9])
def test_assign_roles_needs_at_least_one_base_user(n_test):
    with pytest.raises(ConfigError, match="base task adaptation needs at least one non-test user"):
        assign_roles([_user(name, 2) for name in "abcd"], n_test)


def test_assign_roles_refuses_negative_counts():
    with pytest.raises(ConfigError, match="n_test"):
        assign_roles([_user("a", 1)], -1)


def test_write_then_read_round_trips_users_and_meta(tmp_path):
    users = assign_roles([_user("u1", 3), _user("u2", 1, dated=False), _user("u3", 0)], 1)
    out = write_dataset(tmp_path / "ds", "LaMP_3", users, {"sources": {"questions": "q.json"}})

    assert out == tmp_path / "ds"
    dataset = read_dataset(out)
    assert dataset.task.name == "LaMP-3"
    assert dataset.users == users
    assert [u.user_id for u in dataset.test_users()] == ["u1"]
    assert [u.user_id for u in dataset.base_users()] == ["u2", "u3"]
    assert dataset.user("u2").history[0].date is None
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert {k: meta[k] for k in ("task", "n_users", "n_test_users", "n_history_items", "n_queries",
                                 "sources")} == {
        "task": "LaMP-3", "n_users": 3, "n_test_users": 1, "n_history_items": 4, "n_queries": 3,
        "sources": {"questions": "q.json"}}
    table = pq.read_table(users_parquet_path(out))
    assert table.column_names == ["user_id", "role", "n_history", "n_queries", "history", "queries"]
    assert table.column("n_history").to_pylist() == [3, 1, 0]


def test_reads_from_a_file_uri(tmp_path):
    users = assign_roles([_user("u1", 2), _user("u2", 1)], 1)
    uri = f"file://{tmp_path}/ds"
    assert write_dataset(uri, "LaMP-3", users, {}) == tmp_path / "ds"

    dataset = read_dataset(uri)
    assert dataset.user("u1").role == "test"
    assert dataset.location == uri
    with pytest.raises(KeyError, match="'nobody' is not in the data set"):
        dataset.user("nobody")


def test_a_directory_without_dataset_json_is_not_a_data_set(tmp_path):
    with pytest.raises(DataError, match="dataset.json is missing") as caught:
        read_dataset(tmp_path)
    assert caught.value.file.endswith("dataset.json")


def test_rows_count_must_match_dataset_json(tmp_path):
    write_dataset(tmp_path, "LaMP-3", assign_roles([_user("u1", 2), _user("u2", 1)], 1), {})
    meta = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**meta, "n_users": 5}))
    with pytest.raises(DataError, match="says 5 users but users.parquet holds 2"):
        read_dataset(tmp_path)


def test_write_refuses_duplicate_users(tmp_path):
    with pytest.raises(DataError, match="duplicate user"):
        write_dataset(tmp_path, "LaMP-3", [_user("u1", 1), _user("u1", 2)], {})


def test_fingerprint_follows_the_history_only():
    user = _user("u1", 3)
    same = _user("u1", 3)
    same.queries = []
    changed = _user("u1", 3)
    changed.history[1] = HistoryItem(id="u1-1", fields={"text": "edited", "score": "2"},
                                     date="2020-01-02")

    assert dataset_fingerprint(user) == dataset_fingerprint(same)
    assert dataset_fingerprint(user) != dataset_fingerprint(changed)
    assert dataset_fingerprint(user) != dataset_fingerprint(_user("u1", 2))
    assert len(dataset_fingerprint(user)) == 64


def test_history_span_names_first_and_last_items():
    assert history_span(_user("u1", 3)) == {
        "n_items": 3, "first_item_id": "u1-0", "last_item_id": "u1-2",
        "first_date": "2020-01-01", "last_date": "2020-01-03"}
    assert history_span(_user("u2", 0))["n_items"] == 0
