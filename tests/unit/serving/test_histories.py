"""The serve app's users' histories: its own additions at once, others' within history_check_ttl_s."""

from __future__ import annotations

import time

import pytest

from oppu.erasure import add_tombstone
from oppu.errors import UserErasedError
from oppu.serving.histories import UserHistories
from oppu.user_history import HistoryErrors, add_user_history
from tests.unit.data.fixtures.lamp_files import item, write_movies

NEW = item("n1", "2022-01-01", description="a heist", tag="action")


@pytest.fixture
def data(tmp_path):
    from oppu.cli import main

    questions, outputs = write_movies(tmp_path)
    assert main(["prepare", "--task", "LaMP-2M", "--questions", str(questions), "--outputs", str(outputs),
                 "--n-test", "1", "--out", str(tmp_path / "data")]) == 0
    return str(tmp_path / "data")


def test_own_additions_at_once_and_others_after_the_ttl(data, tmp_path):
    store = str(tmp_path / "adapters")
    histories = UserHistories(data, check_ttl_s=0.3)
    with pytest.raises(KeyError):
        histories.history("newbie")
    update = histories.add(store, "newbie", [NEW])
    assert update.created and [i.id for i in histories.history("newbie")] == ["n1"]

    n_u1 = len(histories.history("u1"))
    add_user_history(data, store, "u1", [item("n2", description="x", tag="comedy")])  # elsewhere
    assert len(histories.history("u1")) == n_u1  # trusted for the ttl
    time.sleep(0.35)
    assert [i.id for i in histories.history("u1")][-1] == "n2"

    with pytest.raises(HistoryErrors) as bad:
        histories.add(store, "newbie", [{"id": "n3", "description": "no tag"}])
    assert (bad.value.record, bad.value.field, bad.value.file) == ("n3", "profile[0].tag", "<request>")
    add_tombstone(store, "gone")
    with pytest.raises(UserErasedError, match="oppu users restore"):
        histories.add(store, "gone", [NEW])


def test_an_erased_user_has_no_history_here_at_once_and_elsewhere_after_the_ttl(data, tmp_path):
    from oppu.erasure import remove_tombstone

    store = str(tmp_path / "adapters")
    histories = UserHistories(data, check_ttl_s=0.3, store_uri=store)
    here = UserHistories(data, check_ttl_s=60, store_uri=store)
    assert histories.history("u1") and here.history("u1")
    add_tombstone(store, "u1")  # erased through another replica (or the command line)
    here.forget("u1")  # ... and through this one
    with pytest.raises(KeyError):
        here.history("u1")
    assert histories.history("u1")  # trusted for the ttl
    time.sleep(0.35)
    with pytest.raises(KeyError):
        histories.history("u1")
    remove_tombstone(store, "u1")  # oppu users restore
    time.sleep(0.35)
    assert histories.history("u1")
