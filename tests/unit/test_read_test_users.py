"""A stage's users, picked and ordered in the driver (oppu.actor_pools.read_test_users)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oppu.actor_pools import read_test_users
from oppu.errors import DataError


def _write(directory, rows):
    columns = {name: [row[name] for row in rows] for name in ("user_id", "role", "n_history", "n_queries")}
    columns["history"] = [[] for _ in rows]
    columns["queries"] = [[] for _ in rows]
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), directory / "users.parquet")


def test_test_users_only_kept_ones_longest_history_first_ties_by_id(tmp_path):
    rows = [dict(user_id=u, role=r, n_history=n, n_queries=1) for u, r, n in
            [("b", "test", 5), ("a", "test", 5), ("z", "base", 50), ("c", "test", 9), ("gone", "test", 99),
             ("d", "test", 1)]]
    _write(tmp_path / "data", rows)
    table = read_test_users(str(tmp_path / "data"), lambda user: user != "gone", longest_first=True)
    assert table["user_id"].to_pylist() == ["c", "a", "b", "d"]
    assert read_test_users(str(tmp_path / "data"))["user_id"].to_pylist() == ["b", "a", "c", "gone", "d"]


def test_a_missing_users_table_names_the_file(tmp_path):
    with pytest.raises(DataError, match="users.parquet is missing"):
        read_test_users(str(tmp_path / "nowhere"))
