"""The derived histories of the suites: least relevant items, activity buckets, sized items,
history formats, and the user subset."""

from __future__ import annotations

import pytest

from oppu.analysis.activity import bucket_users
from oppu.analysis.behaviour_shift import least_relevant_history
from oppu.analysis.history_format import format_samples
from oppu.analysis.runs import pick_users
from oppu.analysis.training_cost import linear_fit, sized_history
from oppu.data.records import HistoryItem, Query, UserData
from oppu.tasks import get_task

TASK = get_task("LaMP-2M")


def _user(user_id: str, descriptions: list[str], query: str = "a robot travels to space") -> UserData:
    history = [HistoryItem(f"{user_id}-{i}", {"description": d, "tag": "sci-fi"})
               for i, d in enumerate(descriptions)]
    return UserData(user_id, "test", history,
                    [Query(f"{user_id}-q", TASK.lamp_input({"description": query}), "sci-fi", 1)])


def test_least_relevant_history_keeps_the_items_furthest_from_the_queries_in_time_order():
    user = _user("u", ["a robot travels to space", "a cooking contest in rome", "robot space war",
                       "a quiet village wedding"])
    shifted = least_relevant_history(TASK, user, keep_fraction=0.5)
    assert [h.id for h in shifted.history] == ["u-1", "u-3"]
    assert all(q.visible_history == 2 for q in shifted.queries)
    assert shifted.user_id == "u" and shifted.role == "test"


def test_activity_buckets_have_equal_sizes_and_increasing_history():
    users = [_user(f"u{n:02d}", ["film"] * n) for n in range(1, 31)]
    buckets = bucket_users(users, n_buckets=3, per_bucket=2)
    assert [len(v) for v in buckets.values()] == [2, 2, 2]
    spans = [[len(u.history) for u in v] for v in buckets.values()]
    assert max(spans[0]) < min(spans[1]) and max(spans[1]) < min(spans[2])
    assert list(buckets)[0] == f"{spans[0][0]}-{spans[0][1]} items"


def test_pick_users_spreads_over_activity():
    users = [_user(f"u{n:02d}", ["film"] * n) for n in range(1, 11)]
    picked = pick_users(users, 3)
    assert [len(u.history) for u in picked] == [10, 7, 4]
    assert pick_users(users, 20) == sorted(users, key=lambda u: -len(u.history))


def test_sized_history_sets_item_count_and_tokens_per_item():
    user = _user("u", ["one two three", "four five"])
    sized = sized_history(TASK, user, n_items=5, tokens_per_item=7)
    assert len(sized.history) == 5 and len({h.id for h in sized.history}) == 5
    assert all(len(h.fields["description"].split()) == 7 for h in sized.history)
    assert sized.history[0].fields["description"] == "one two three one two three one"
    assert all(h.fields["tag"] == "sci-fi" for h in sized.history)


def test_history_formats():
    user = _user("u", ["a robot film"])
    inputs, outputs, both = (format_samples(TASK, user, f) for f in ("input only", "output only", "input + output"))
    assert (inputs[0].prompt, inputs[0].target) == ("", "a robot film")
    assert (outputs[0].prompt, outputs[0].target) == ("", "sci-fi")
    assert both[0].target == " sci-fi" and "a robot film" in both[0].prompt


def test_linear_fit():
    fit = linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit["slope_s"] == pytest.approx(2) and fit["intercept_s"] == pytest.approx(1)
    assert fit["r2"] == pytest.approx(1)
