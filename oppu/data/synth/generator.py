"""``generate``: a task's synthetic users written as official LaMP files plus ``reference.json``.

Users get long-tailed history lengths (lognormal), a persona, and dated history items; their
latest events are the queries, and every query's profile is the user's whole history (all of it
is dated before the queries). The ``n_test`` most active users, chosen with
``oppu.data.dataset.assign_roles`` (the rule ``oppu prepare`` applies), are the test users, and
``reference.json`` scores the two reference predictions on exactly their queries.

With ``shift_at`` (LaMP-2M, LaMP-2N) every user's behaviour shifts: from the first history item
at that fraction of their history on, and at their queries, they have another persona's taste;
``reference.json`` records, per user, the new persona and ``items_before``/``first_item_id``, where
the shifted history starts.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oppu.data.dataset import assign_roles
from oppu.data.records import HistoryItem, UserData
from oppu.data.synth.world import PlantedUser, SynthQuery, World, persona_of_users
from oppu.errors import ConfigError

# Fixed codes keep each task's random stream apart: the same seed gives unrelated data per task.
TASK_STREAM_CODES = {"LaMP-1": 1, "LaMP-2N": 2, "LaMP-2M": 3, "LaMP-3": 4, "LaMP-4": 5, "LaMP-5": 6, "LaMP-7": 7}
SYNTHETIC_TASKS = tuple(TASK_STREAM_CODES)


@dataclass(frozen=True)
class ActivitySettings:
    median_history: float = 20.0
    history_sigma: float = 0.9  # lognormal shape: a long tail of very active users
    min_history: int = 4
    max_history: int = 150
    min_test_history: int = 30  # test users train a personal adapter on at least this many items
    first_date: dt.date = dt.date(2012, 1, 1)
    start_spread_days: int = 1000
    max_gap_days: int = 7


@dataclass(frozen=True)
class SynthPaths:
    out_dir: Path
    questions: Path  # questions.json: [{"id", "input", "profile", "user_id"}]
    outputs: Path  # outputs.json: {"task", "golds": [{"id", "output"}]}
    reference: Path  # reference.json: population and Bayes-optimal scores, planted preferences


@dataclass(frozen=True)
class _SynthUser:
    user_id: str
    planted: PlantedUser
    history: list[HistoryItem]
    queries: list[tuple[str, SynthQuery]]  # (query id, query)


def build_world(task_name: str, layout_rng: np.random.Generator) -> World:
    """The generative process of ``task_name`` (a canonical name such as ``LaMP-2M``)."""
    from oppu.data.synth.citation import CitationWorld
    from oppu.data.synth.classification import ItemFields, LabelChoiceWorld
    from oppu.data.synth.generation import HEADLINE_STYLE, PAPER_TITLE_STYLE, TWEET_STYLE, StyleWorld
    from oppu.data.synth.rating import RatingBiasWorld
    from oppu.data.synth.vocabulary import MOVIE_TAG_KEYWORDS, NEWS_CATEGORY_KEYWORDS
    from oppu.tasks.labels import LAMP_2M_LABELS, LAMP_2N_LABELS

    if task_name == "LaMP-2M":
        return LabelChoiceWorld(LAMP_2M_LABELS, MOVIE_TAG_KEYWORDS, ItemFields(text="description", label="tag"),
                                layout_rng)
    if task_name == "LaMP-2N":
        return LabelChoiceWorld(LAMP_2N_LABELS, NEWS_CATEGORY_KEYWORDS,
                                ItemFields(text="text", label="category", title="title"), layout_rng)
    if task_name == "LaMP-3":
        return RatingBiasWorld(layout_rng)
    if task_name == "LaMP-1":
        return CitationWorld(layout_rng)
    if task_name == "LaMP-4":
        return StyleWorld(HEADLINE_STYLE)
    if task_name == "LaMP-5":
        return StyleWorld(PAPER_TITLE_STYLE)
    if task_name == "LaMP-7":
        return StyleWorld(TWEET_STYLE)
    raise ConfigError(f"task: no synthetic generator for {task_name!r}; "
                      f"choose one of {', '.join(SYNTHETIC_TASKS)}")


def history_lengths(rng: np.random.Generator, n_users: int, n_test: int,
                    settings: ActivitySettings) -> list[int]:
    """Lognormal history lengths; the ``n_test`` longest are raised to ``min_test_history``."""
    drawn = rng.lognormal(np.log(settings.median_history), settings.history_sigma, size=n_users)
    lengths = np.clip(np.round(drawn), settings.min_history, settings.max_history).astype(int)
    most_active = np.argsort(-lengths, kind="stable")[:n_test]
    lengths[most_active] = np.maximum(lengths[most_active], settings.min_test_history)
    return [int(n) for n in lengths]


def _make_user(world: World, user_id: str, persona: int, n_history: int, queries_per_user: int,
               rng: np.random.Generator, settings: ActivitySettings, shift_at: float | None = None) -> _SynthUser:
    planted = world.new_user(rng, persona)
    if shift_at is not None:
        planted = world.shifted(planted, rng, shift_at)
    date = settings.first_date + dt.timedelta(days=int(rng.integers(settings.start_spread_days)))
    history = []
    for j in range(n_history):
        date += dt.timedelta(days=int(rng.integers(1, settings.max_gap_days + 1)))
        fields = world.history_item(planted, rng, progress=j / n_history)
        history.append(HistoryItem(id=f"{user_id}-h{j:03d}", fields=fields, date=date.isoformat()))
    queries = [(f"{user_id}-q{k}", world.query(planted, rng, query_index=k)) for k in range(queries_per_user)]
    return _SynthUser(user_id=user_id, planted=planted, history=history, queries=queries)


def _write_json(path: Path, content: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(content, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def shift_index(n_history: int, shift_at: float) -> int:
    """How many of a user's ``n_history`` items come before a shift at ``shift_at`` (item j is
    written at progress j / n_history)."""
    return next((j for j in range(n_history) if j / n_history >= shift_at), n_history)


def generate(task: str, n_users: int, seed: int, out_dir: str | Path, n_test: int,
             queries_per_user: int = 5, activity: ActivitySettings | None = None,
             shift_at: float | None = None) -> SynthPaths:
    """Write ``questions.json``, ``outputs.json`` and ``reference.json`` for ``task`` into ``out_dir``.

    The same (task, n_users, seed, n_test, queries_per_user, shift_at) gives the same files byte
    for byte; without ``shift_at`` they are those of a generator that knew no shift.
    """
    from oppu.tasks import get_task

    lamp_task = get_task(task)
    activity = activity or ActivitySettings()
    if lamp_task.name not in TASK_STREAM_CODES:
        raise ConfigError(f"task: no synthetic generator for {lamp_task.name!r}")
    if not 1 <= n_test < n_users:
        raise ConfigError(f"n_test: need 1 <= n_test < n_users ({n_users}) so base users remain, got {n_test}")
    if queries_per_user < 1:
        raise ConfigError(f"queries_per_user: must be >= 1, got {queries_per_user}")
    if shift_at is not None and not 0 < shift_at < 1:
        raise ConfigError(f"shift_at: the shift's place in a user's history must be in (0, 1), got {shift_at}")

    layout_seed, activity_seed, users_seed = np.random.SeedSequence(
        seed, spawn_key=(TASK_STREAM_CODES[lamp_task.name],)).spawn(3)
    world = build_world(lamp_task.name, np.random.default_rng(layout_seed))
    if shift_at is not None and not hasattr(world, "shifted"):
        raise ConfigError(f"shift_at: a behaviour shift is synthesized for LaMP-2M and LaMP-2N only, "
                          f"not {lamp_task.name}")
    activity_rng = np.random.default_rng(activity_seed)
    lengths = history_lengths(activity_rng, n_users, n_test, activity)
    personas = persona_of_users(activity_rng, n_users, len(world.personas))
    width = len(str(n_users - 1))
    users = [
        _make_user(world, f"user{i:0{width}d}", personas[i], lengths[i], queries_per_user,
                   np.random.default_rng(user_seed), activity, shift_at)
        for i, user_seed in enumerate(users_seed.spawn(n_users))
    ]
    roles = {u.user_id: u.role for u in assign_roles(
        [UserData(user_id=u.user_id, role="base", history=u.history) for u in users], n_test)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = SynthPaths(out_dir=out, questions=out / "questions.json", outputs=out / "outputs.json",
                       reference=out / "reference.json")
    questions, golds = [], []
    for user in users:
        profile = [{"id": item.id, **item.fields, "date": item.date} for item in user.history]
        for query_id, query in user.queries:
            questions.append({"id": query_id, "input": lamp_task.lamp_input(query.fields), "profile": profile,
                              "user_id": user.user_id})
            golds.append({"id": query_id, "output": query.gold})
    _write_json(paths.questions, questions)
    _write_json(paths.outputs, {"task": lamp_task.lamp_name, "golds": golds})

    test_queries = [q for u in users if roles[u.user_id] == "test" for _, q in u.queries]
    test_golds = [q.gold for q in test_queries]
    reference = {
        "task": lamp_task.name,
        "seed": seed,
        "n_users": n_users,
        "n_test_users": n_test,
        "queries_per_user": queries_per_user,
        "personas": list(world.personas),
        "population": lamp_task.score(test_golds, [q.population for q in test_queries]),
        "bayes": lamp_task.score(test_golds, [q.bayes for q in test_queries]),
        "users": {u.user_id: {"role": roles[u.user_id], "n_history": len(u.history), **u.planted.reference()}
                  for u in users},
    }
    if shift_at is not None:
        reference["shift_at"] = shift_at
        for user in users:
            before = shift_index(len(user.history), shift_at)
            reference["users"][user.user_id]["shift"].update(
                items_before=before, first_item_id=user.history[before].id if before < len(user.history) else None)
    _write_json(paths.reference, reference, indent=1)
    return paths
