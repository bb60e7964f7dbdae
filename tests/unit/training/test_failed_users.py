"""train_users fails loudly (issue #15): more failed users than ``users.max_failed_users`` raise
``StageFailed`` naming how many and which, and where their errors are."""

from __future__ import annotations

import pytest

from oppu.errors import StageFailed
from oppu.training.users import check_failed_users
from oppu.training.users_report import UserResult


def _config(tmp_path, *overrides):
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    return load_config(RunConfig, None, [f"run_dir={tmp_path}", *overrides])


RESULTS = [UserResult("ann", "trained"), UserResult("bob", "failed", error="DataError: no tag"),
           UserResult("cy", "skipped"), UserResult("dee", "failed", error="RuntimeError: boom")]


def test_every_failed_user_fails_the_stage_by_default(tmp_path):
    with pytest.raises(StageFailed) as raised:
        check_failed_users(_config(tmp_path), "rag-k1+oppu", RESULTS)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("train_users rag-k1+oppu: 2 of 4 users failed (bob, dee), more than "
                              "users.max_failed_users=0 allows")
    assert str(tmp_path / "reports" / "train_users-rag-k1_oppu.json") in message


def test_all_users_failed_is_a_failure(tmp_path):
    with pytest.raises(StageFailed, match="2 of 2 users failed"):
        check_failed_users(_config(tmp_path), "oppu", [UserResult("a", "failed"), UserResult("b", "failed")])


@pytest.mark.parametrize("allowed", ["2", "5", "-1"])
def test_the_threshold_allows_that_many(tmp_path, allowed, caplog):
    caplog.set_level("WARNING", logger="oppu")
    check_failed_users(_config(tmp_path, f"users.max_failed_users={allowed}"), "oppu", RESULTS)
    assert any("2 of 4 users failed, within users.max_failed_users" in r.getMessage() for r in caplog.records)


def test_one_too_many_fails(tmp_path):
    with pytest.raises(StageFailed, match="max_failed_users=1 allows"):
        check_failed_users(_config(tmp_path, "users.max_failed_users=1"), "oppu", RESULTS)


def test_no_failures_pass_silently(tmp_path):
    check_failed_users(_config(tmp_path), "oppu", [r for r in RESULTS if r.status != "failed"])
    check_failed_users(_config(tmp_path), "oppu", [])


def test_a_long_list_of_failed_users_is_cut(tmp_path):
    results = [UserResult(f"u{i:03d}", "failed") for i in range(30)]
    with pytest.raises(StageFailed, match=r"\(u000, u001, .*, u019 and 10 more\)"):
        check_failed_users(_config(tmp_path), "oppu", results)
