"""The synthetic generator writes valid LaMP files whose planted structure is real and measurable."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from oppu.data.synth import SYNTHETIC_TASKS, generate
from oppu.data.synth.vocabulary import RESEARCH_TOPIC_KEYWORDS
from oppu.errors import ConfigError
from oppu.tasks import get_task

TASKS = SYNTHETIC_TASKS
GENERATION_TASKS = ("LaMP-4", "LaMP-5", "LaMP-7")
N_USERS, N_TEST, QUERIES = 24, 6, 3


def _load(paths) -> tuple[list[dict], dict, dict]:
    questions = json.loads(paths.questions.read_text(encoding="utf-8"))
    outputs = json.loads(paths.outputs.read_text(encoding="utf-8"))
    reference = json.loads(paths.reference.read_text(encoding="utf-8"))
    return questions, outputs, reference


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> dict[str, tuple[list[dict], dict, dict]]:
    root = tmp_path_factory.mktemp("synth")
    return {task: _load(generate(task, N_USERS, 7, root / task, N_TEST, queries_per_user=QUERIES))
            for task in TASKS}


@pytest.fixture(scope="module")
def quickstart_sets(tmp_path_factory) -> dict[str, tuple[list[dict], dict, dict]]:
    root = tmp_path_factory.mktemp("synth_quickstart")
    return {task: _load(generate(task, 48, 3, root / task, 12, queries_per_user=5))
            for task in ("LaMP-1", "LaMP-2M", "LaMP-2N", "LaMP-3")}


def _user_histories(questions: list[dict]) -> dict[str, list[dict]]:
    return {q["user_id"]: q["profile"] for q in questions}


@pytest.mark.parametrize("task_name", TASKS)
def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, task_name: str):
    first = generate(task_name, 8, 11, tmp_path / "a", 2, queries_per_user=2)
    again = generate(task_name, 8, 11, tmp_path / "b", 2, queries_per_user=2)
    other = generate(task_name, 8, 12, tmp_path / "c", 2, queries_per_user=2)
    for name in ("questions", "outputs", "reference"):
        assert getattr(first, name).read_bytes() == getattr(again, name).read_bytes()
    assert first.questions.read_bytes() != other.questions.read_bytes()


@pytest.mark.parametrize("task_name", TASKS)
def test_files_are_official_lamp_format(small_sets, task_name: str):
    task = get_task(task_name)
    questions, outputs, reference = small_sets[task_name]
    assert outputs["task"] == task.lamp_name
    question_ids = [q["id"] for q in questions]
    assert len(set(question_ids)) == len(question_ids) == N_USERS * QUERIES
    assert sorted(g["id"] for g in outputs["golds"]) == sorted(question_ids)
    item_ids = [item["id"] for profile in _user_histories(questions).values() for item in profile]
    assert len(set(item_ids)) == len(item_ids)
    for question in questions:
        assert set(question) == {"id", "input", "profile", "user_id"}
        assert task.lamp_input(task.parse_query(question["input"])) == question["input"]
        for item in question["profile"]:
            assert set(item) == {"id", "date", *task.item_fields}
            assert all(isinstance(item[f], str) and item[f] for f in task.item_fields)
    if task.labels is not None:
        assert {g["output"] for g in outputs["golds"]} <= set(task.labels)
    if task.labels is not None and task.output_field is not None:
        assert {item[task.output_field] for q in questions for item in q["profile"]} <= set(task.labels)
    assert reference["task"] == task.name and reference["n_test_users"] == N_TEST
    assert set(reference["population"]) == set(reference["bayes"]) == set(task.metric_names)
    assert set(reference["users"]) == {q["user_id"] for q in questions}


@pytest.mark.parametrize("task_name", TASKS)
def test_dates_increase_and_every_query_sees_the_whole_history(small_sets, task_name: str):
    questions, _, _ = small_sets[task_name]
    by_user = defaultdict(list)
    for question in questions:
        by_user[question["user_id"]].append(question["profile"])
    for profiles in by_user.values():
        assert all(profile == profiles[0] for profile in profiles)
        dates = [dt.date.fromisoformat(item["date"]) for item in profiles[0]]
        assert all(a < b for a, b in zip(dates, dates[1:], strict=False))


def test_test_users_are_the_most_active_with_enough_history(quickstart_sets):
    _, _, reference = quickstart_sets["LaMP-2M"]
    users = reference["users"]
    ranked = sorted(users, key=lambda uid: (-users[uid]["n_history"], uid))
    assert set(ranked[:12]) == {uid for uid, u in users.items() if u["role"] == "test"}
    assert min(users[uid]["n_history"] for uid in ranked[:12]) >= 30
    lengths = np.array([u["n_history"] for u in users.values()])
    assert lengths.max() >= 3 * np.median(lengths)  # a long tail of very active users


@pytest.mark.parametrize(("task_name", "metric", "margin"), [
    ("LaMP-1", "accuracy", 0.2), ("LaMP-2M", "accuracy", 0.2), ("LaMP-2N", "accuracy", 0.2),
    ("LaMP-3", "MAE", -0.4)])
def test_bayes_reference_clearly_beats_population(quickstart_sets, task_name: str, metric: str, margin: float):
    _, _, reference = quickstart_sets[task_name]
    gap = reference["bayes"][metric] - reference["population"][metric]
    assert gap >= margin if margin > 0 else gap <= margin


@pytest.mark.parametrize("task_name", GENERATION_TASKS)
def test_the_users_own_style_beats_the_population_style(small_sets, task_name: str):
    _, _, reference = small_sets[task_name]
    assert reference["bayes"]["rouge-1"] >= reference["population"]["rouge-1"] + 0.2


@pytest.mark.parametrize("task_name", ["LaMP-2M", "LaMP-2N"])
def test_users_mostly_choose_their_personas_labels(quickstart_sets, task_name: str):
    questions, _, reference = quickstart_sets[task_name]
    label_field = "tag" if task_name == "LaMP-2M" else "category"
    for user_id, profile in _user_histories(questions).items():
        planted = reference["users"][user_id]
        most_frequent, _ = Counter(item[label_field] for item in profile).most_common(1)[0]
        if len(profile) >= 20:
            assert most_frequent in planted["persona_labels"], user_id


def test_rating_users_score_by_their_planted_bias(quickstart_sets):
    questions, _, reference = quickstart_sets["LaMP-3"]
    scores_by_persona = defaultdict(list)
    for user_id, profile in _user_histories(questions).items():
        bias = reference["users"][user_id]["persona_bias"]
        scores_by_persona[bias].extend(int(item["score"]) for item in profile)
    means = [np.mean(scores_by_persona[bias]) for bias in sorted(scores_by_persona)]
    assert len(means) == 4 and all(a + 0.3 < b for a, b in zip(means, means[1:], strict=False))


def test_researchers_write_mostly_on_their_personas_topics(quickstart_sets):
    questions, _, reference = quickstart_sets["LaMP-1"]
    topic_of_word = {word: topic for topic, words in RESEARCH_TOPIC_KEYWORDS.items() for word in words}
    for user_id, profile in _user_histories(questions).items():
        topics = Counter(topic_of_word[word] for item in profile for word in item["title"].split()
                         if word in topic_of_word)
        if len(profile) >= 20:
            assert topics.most_common(1)[0][0] in reference["users"][user_id]["persona_topics"], user_id


@pytest.mark.parametrize("task_name", GENERATION_TASKS)
def test_generation_outputs_carry_the_users_style_and_the_inputs_content(small_sets, task_name: str):
    task = get_task(task_name)
    questions, outputs, reference = small_sets[task_name]
    signed = []
    for user_id, profile in _user_histories(questions).items():
        signature = reference["users"][user_id]["signature"]
        outputs_of_user = [item[task.output_field or "text"] for item in profile]
        signed_by_user = [signature in text.split() for text in outputs_of_user]
        assert sum(signed_by_user) >= len(outputs_of_user) / 3, user_id
        signed.extend(signed_by_user)
    assert np.mean(signed) >= 0.6
    gold_of = {g["id"]: g["output"] for g in outputs["golds"]}
    for question in questions:
        query_text = next(iter(task.parse_query(question["input"]).values()))
        content = set(query_text.replace(".", "").split())
        assert reference["users"][question["user_id"]]["signature"] not in content
        assert len(content & set(gold_of[question["id"]].split())) >= 2


def test_tweet_history_is_tweets_only(small_sets):
    questions, _, _ = small_sets["LaMP-7"]
    assert all(set(item) == {"id", "date", "text"} for q in questions for item in q["profile"])


def test_bad_sizes_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="n_test"):
        generate("LaMP-2M", 5, 0, tmp_path, n_test=5)


def test_behaviour_shift_changes_taste_at_the_recorded_item(tmp_path: Path):
    """With shift_at, each user's labels before the recorded first shifted item are mostly their
    persona's, after it (and the golds of their queries) mostly the new persona's."""
    paths = generate("LaMP-2M", 24, 3, tmp_path / "shift", 6, queries_per_user=8, shift_at=0.6)
    questions, outputs, reference = _load(paths)
    gold_of = {g["id"]: g["output"] for g in outputs["golds"]}
    assert reference["shift_at"] == 0.6
    before_own = after_new = after_old = golds_new = n_before = n_after = n_golds = 0
    for user_id, profile in _user_histories(questions).items():
        planted = reference["users"][user_id]
        shift = planted["shift"]
        assert shift["persona"] != planted["persona"]
        assert not set(shift["persona_labels"]) & set(planted["persona_labels"])
        split = shift["items_before"]
        assert split == int(np.ceil(0.6 * len(profile))) and shift["first_item_id"] == profile[split]["id"]
        before_own += sum(item["tag"] in planted["persona_labels"] for item in profile[:split])
        after_new += sum(item["tag"] in shift["persona_labels"] for item in profile[split:])
        after_old += sum(item["tag"] in planted["persona_labels"] for item in profile[split:])
        n_before, n_after = n_before + split, n_after + len(profile) - split
        for question in questions:
            if question["user_id"] == user_id:
                golds_new += gold_of[question["id"]] in shift["persona_labels"]
                n_golds += 1
    assert before_own / n_before > 0.6 and after_new / n_after > 0.6 and after_old / n_after < 0.2
    assert golds_new / n_golds > 0.6
    unshifted = generate("LaMP-2M", 24, 3, tmp_path / "plain", 6, queries_per_user=8)
    assert "shift_at" not in _load(unshifted)[2]
    with pytest.raises(ConfigError, match="LaMP-2M and LaMP-2N only"):
        generate("LaMP-3", 8, 0, tmp_path / "rating", 2, shift_at=0.5)
