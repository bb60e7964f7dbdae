"""Profiles on disk: one Parquet file per writer beside the data, written once and reused."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from oppu.data.records import HistoryItem, UserData
from oppu.errors import DataError, UserIdError
from oppu.profiles import ensure_profiles, profiles_uri, read_profiles, write_profiles
from oppu.tasks import get_task


class CountingWriter:
    name = "counting"

    def __init__(self):
        self.asked: list[str] = []

    def write(self, task, users):
        self.asked += [u.user_id for u in users]
        return {u.user_id: f"profile of {u.user_id}" for u in users}


def _users(*ids: str) -> list[UserData]:
    return [UserData(i, "test", [HistoryItem("h", {"description": "d", "tag": "comedy"})]) for i in ids]


def test_profiles_round_trip_with_the_documented_columns(tmp_path):
    uri = write_profiles(str(tmp_path), "statistical", {"b": "two", "a": "one"})
    assert uri == profiles_uri(str(tmp_path), "statistical") == f"{tmp_path}/profiles-statistical.parquet"
    table = pq.read_table(uri)
    assert table.column_names == ["user_id", "writer", "text", "created"]
    assert table.column("user_id").to_pylist() == ["a", "b"]
    assert set(table.column("writer").to_pylist()) == {"statistical"}
    assert read_profiles(str(tmp_path), "statistical") == {"a": "one", "b": "two"}
    assert read_profiles(str(tmp_path), "hf") == {}


def test_ensure_profiles_writes_once_and_only_missing_users(tmp_path):
    writer, task = CountingWriter(), get_task("LaMP-2M")
    first = ensure_profiles(str(tmp_path), writer, task, _users("u1", "u2"), log=lambda _: None)
    again = ensure_profiles(str(tmp_path), writer, task, _users("u1", "u2", "u3"), log=lambda _: None)
    assert writer.asked == ["u1", "u2", "u3"]
    assert first == {"u1": "profile of u1", "u2": "profile of u2"}
    assert again["u3"] == "profile of u3" and len(read_profiles(str(tmp_path), "counting")) == 3


def test_bad_user_ids_and_bad_files_are_refused(tmp_path):
    with pytest.raises(UserIdError):
        write_profiles(str(tmp_path), "statistical", {"../etc": "x"})
    import pyarrow as pa

    pq.write_table(pa.table({"user_id": ["a"]}), tmp_path / "profiles-statistical.parquet")
    with pytest.raises(DataError, match="lacks column"):
        read_profiles(str(tmp_path), "statistical")
