"""``QueryAnswerer`` answers a base-only method for a whole batch of users in one generation: each
user's answers equal the ones it gets alone, and a batch's rows cover every user's queries once."""

from __future__ import annotations

import pytest

from tests.unit.tiny_models import MOVIE_TAGS, build_movie_tag_base, movie_user, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory):
    import shutil

    from oppu.config import from_dict
    from oppu.run_config import RunConfig

    run_dir = tmp_path_factory.mktemp("run")
    base = build_movie_tag_base(run_dir / "tiny")
    shutil.copytree(base, run_dir / "base")
    shutil.copytree(base, run_dir / "base-rag-k1")
    return from_dict(RunConfig, {"task": "LaMP-2M", "run_dir": str(run_dir), "model": str(base),
                                 "base": {"flavours": ["plain", "rag-k1"]},
                                 "eval": {"methods": ["non-personalized", "rag-k1"], "generation_batch_size": 4}})


def _users():
    from oppu.data.records import Query

    users = []
    for u, n_queries in (("u1", 3), ("u2", 1), ("u3", 2)):
        user = movie_user(u, 6, offset=len(users))
        user.queries.extend(Query(id=f"{u}-q{j}", input=f"Which tag does this movie relate to among the "
                                  f"following tags? Just answer with the tag name without further explanation. "
                                  f"tags: [{', '.join(MOVIE_TAGS)}] description: movie {j} with jokes",
                                  gold=MOVIE_TAGS[j % 4], visible_history=6) for j in range(n_queries))
        users.append(user)
    return users


def _batch(users) -> dict:
    rows = [u.to_row() for u in users]
    return {key: [row[key] for row in rows] for key in rows[0]}


def _by_query(answers: dict) -> dict:
    return {(m, q): (p, r, e) for m, q, p, r, e in zip(answers["method"], answers["query_id"], answers["prediction"],
                                                       answers["raw"], answers["error"], strict=True)}


def _together_and_alone(answerer, users) -> tuple[dict, dict]:
    """The answers of one batch of all ``users``, and of a batch per user."""
    alone = {}
    for user in users:
        alone.update(_by_query(answerer(_batch([user]))))
    return _by_query(answerer(_batch(users))), alone


def test_a_batch_answers_each_user_as_alone(run_cfg):
    from oppu.evaluation.runner import QueryAnswerer

    answerer = QueryAnswerer(run_cfg, ["non-personalized", "rag-k1"], random_items={})
    users = _users()
    together, alone = _together_and_alone(answerer, users)
    assert len(together) == 2 * sum(len(u.queries) for u in users) == 12
    assert together == alone
    assert all(not error for _, _, error in together.values())
    assert any(raw for _, raw, _ in together.values())  # the tiny model answered something


def test_label_decoding_answers_the_likeliest_label_the_same_in_any_batch(run_cfg):
    import dataclasses
    import json

    from oppu.evaluation.runner import QueryAnswerer
    from oppu.tasks import get_task

    cfg = dataclasses.replace(run_cfg, eval=dataclasses.replace(run_cfg.eval, decoding="labels", label_batch_size=7))
    answerer = QueryAnswerer(cfg, ["non-personalized", "rag-k1"], random_items={})
    together, alone = _together_and_alone(answerer, _users())
    labels = get_task("LaMP-2M").labels
    assert len(together) == 12
    for (_, _), (prediction, raw, error) in together.items():
        probabilities = json.loads(raw)
        assert not error and list(probabilities) == list(labels)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=2e-3)
        assert probabilities[prediction] == max(probabilities.values())
    assert {key: p for key, (p, _, _) in together.items()} == {key: p for key, (p, _, _) in alone.items()}


def test_the_decoding_a_run_used_is_named_per_task(run_cfg):
    import dataclasses

    from oppu.evaluation.runner import answer_decoding
    from oppu.tasks import get_task

    labels = dataclasses.replace(run_cfg, eval=dataclasses.replace(run_cfg.eval, decoding="labels"))
    assert answer_decoding(labels, get_task("LaMP-3")) == "labels"
    assert answer_decoding(labels, get_task("LaMP-4")) == "greedy"  # a generation task has no labels
    assert answer_decoding(run_cfg, get_task("LaMP-2M")) == "greedy"  # the library's default
