"""The leak check (``oppu.analysis.leakage``): a test query's answer in any text a model was
trained on before the query is evaluated.

On the integration test's data (synthetic LaMP-2M, 24 users, seed 5, 8 test users), the activity
suite's held-out users include base users of the main run, so the main run's pretraining corpus
holds their test answers; a model pretrained on the sub run's own base users does not.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from oppu.analysis.activity import bucket_users
from oppu.analysis.leakage import answer_renderings, find_leaks, pretraining_texts, run_training_texts
from oppu.data.records import HistoryItem, Query, UserData
from oppu.errors import ConfigError
from oppu.tasks import get_task

TASK = get_task("LaMP-2M")
TINY = ["tiny.hidden_size=16", "tiny.num_layers=1", "tiny.num_heads=2", "tiny.num_kv_heads=2",
        "tiny.intermediate_size=32", "tiny.vocab_size=300", "tiny.pretrain_steps=1", "tiny.pretrain_batch_size=2",
        "tiny.pretrain_seq_len=32", "tiny.num_threads=1", "tiny.tokenizer_max_chars=20000"]


def _query(qid: str, description: str, gold: str) -> Query:
    return Query(id=qid, input=TASK.lamp_input({"description": description}), gold=gold, visible_history=0)


def _user(uid: str, queries: list[Query], history: list[tuple[str, str]] = (), role: str = "test") -> UserData:
    items = [HistoryItem(id=f"{uid}-h{i}", date=f"2020-01-{i + 1:02d}", fields={"description": d, "tag": t})
             for i, (d, t) in enumerate(history)]
    return UserData(user_id=uid, role=role, history=items, queries=queries)


def test_an_answer_is_found_as_a_query_sample_and_as_a_history_item():
    user = _user("u1", [_query("q1", "a robot learns to love", "romance")])
    sample = TASK.query_sample({"description": "a robot learns to love"}, "romance")
    item = TASK.render_item({"description": "a robot learns to love", "tag": "romance"}).strip()
    assert sample.prompt + sample.target in answer_renderings(TASK, {"description": "a robot learns to love"}, "romance")
    for text in (sample.prompt + sample.target, f"other: x\n{item}\nmore", "prefix " + item):
        assert [(leak.user_id, leak.query_id) for leak in find_leaks(TASK, [user], {"t": [text]})] == [("u1", "q1")]


@pytest.mark.parametrize("text", [
    "description: a robot learns to love tag: sci-fi",  # the question with another answer
    "description: a robot learns to cook tag: romance",  # the answer to another question
    "description: a robot learns to love tag: romance-drama",  # not the gold, a longer word
    "Which tag ... tags: [sci-fi, romance] description: a robot learns to love tag:",  # the question alone
])
def test_the_question_or_the_label_alone_is_no_leak(text):
    user = _user("u1", [_query("q1", "a robot learns to love", "romance")])
    assert find_leaks(TASK, [user], {"t": [text]}) == []


def test_personal_texts_count_only_for_their_own_user():
    a = _user("a", [_query("qa", "a heist goes wrong", "action")])
    b = _user("b", [_query("qb", "two friends on a road trip", "comedy")])
    own = TASK.render_item({"description": "a heist goes wrong", "tag": "action"})
    leaks = find_leaks(TASK, [a, b], {}, personal={"b": {"personal:oppu": [own]}})
    assert leaks == []  # b's adapter saw a's answer, but a's model did not
    leaks = find_leaks(TASK, [a, b], {}, personal={"a": {"personal:oppu": [own]}})
    assert [(leak.user_id, leak.source) for leak in leaks] == [("a", "personal:oppu")]


def test_generation_golds_count_alone():
    task = get_task("LaMP-5")
    fields = {name: "we study many things" for name in task.query_fields}
    user = UserData(user_id="u", role="test", history=[], queries=[
        Query(id="q", input=task.lamp_input(fields), gold="Deep Personal Adapters", visible_history=0)])
    assert find_leaks(task, [user], {"t": ["title: Deep Personal Adapters\n"]})
    assert find_leaks(task, [user], {"t": ["title: Deep Personal Adapters for All"]})  # inside a longer one too
    assert not find_leaks(task, [user], {"t": ["title: Deep Personal Adapter Banks"]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The integration test's data as a main run, and the activity suite's sub run of it
    (2 buckets x 3 users held out), each with a tiny model pretrained on its base users' text."""
    from oppu import cli
    from oppu.analysis.runs import write_sub_dataset
    from oppu.config import load_config
    from oppu.data.dataset import read_dataset
    from oppu.models import build_tiny_base
    from oppu.pipeline import PACKAGED_CONFIGS
    from oppu.run_config import RunConfig
    from oppu.training.samples import pretraining_corpus

    out = tmp_path_factory.mktemp("leak-run")
    lamp = out / "data" / "lamp"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "24", "--seed", "5", "--n-test", "8",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "8", "--out", str(out / "data")]) == 0
    main = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", ["task=LaMP-2M", f"run_dir={out}", *TINY])
    dataset = read_dataset(main.data_uri)
    build_tiny_base(pretraining_corpus(TASK, dataset.base_users()), out / "pretrained", main.tiny, main.seed,
                    use_cache=False)

    buckets = bucket_users([u for u in dataset.users if u.queries], 2, 3)
    held_out = {u.user_id for members in buckets.values() for u in members}
    users = [dataclasses.replace(u, role="test" if u.user_id in held_out else "base") for u in dataset.users]
    sub = dataclasses.replace(main, run_dir=str(out / "analysis" / "activity"))
    write_sub_dataset(sub, main.task, users, {"suite": "activity"})
    return main, sub, dataset, read_dataset(sub.data_uri)


def test_reusing_the_main_runs_pretrained_model_leaks_held_out_answers(runs):
    """The leak of issue 19: with ``--activity-reuse-pretrained`` held-out users that were base
    users of the main run have their test answers in the pretraining text."""
    main, sub, main_data, sub_data = runs
    main_base = {u.user_id for u in main_data.base_users()}
    held_out = sub_data.test_users()
    assert {u.user_id for u in held_out} & main_base, "no held-out user was a main-run base user"
    Path(sub.pretrained_uri).symlink_to(main.pretrained_uri, target_is_directory=True)  # as sub_run links it
    try:
        data_uri, corpus = pretraining_texts(sub, [sub.data_uri, main.data_uri])
        assert data_uri == main.data_uri  # the build hash says: built from the main run's base users
        leaks = find_leaks(TASK, held_out, {"pretraining": corpus})
        leaked_users = {leak.user_id for leak in leaks}
        assert leaked_users == {u.user_id for u in held_out} & main_base
        assert len({leak.query_id for leak in leaks}) == sum(len(u.queries) for u in held_out
                                                             if u.user_id in main_base)
    finally:
        Path(sub.pretrained_uri).unlink()


def test_a_model_pretrained_without_the_held_out_users_has_no_leak(runs):
    from oppu.models import build_tiny_base
    from oppu.training.samples import pretraining_corpus

    main, sub, main_data, sub_data = runs
    try:
        build_tiny_base(pretraining_corpus(TASK, sub_data.base_users()), sub.pretrained_uri, sub.tiny, sub.seed,
                        use_cache=False)
        data_uri, corpus = pretraining_texts(sub, [sub.data_uri, main.data_uri])
        assert data_uri == sub.data_uri
        assert find_leaks(TASK, sub_data.test_users(), {"pretraining": corpus}) == []
        # nor in the personal samples of the users' own history (only earlier items)
        shared, personal = run_training_texts(sub, flavours=(), variants=("oppu", "rag-k1+oppu"))
        assert find_leaks(TASK, sub_data.test_users(), shared, personal) == []
        assert set(personal) == {u.user_id for u in sub_data.test_users()}
        assert all(len(texts) == len(u.history) for u in sub_data.test_users()
                   for texts in personal[u.user_id].values())
    finally:
        shutil.rmtree(sub.pretrained_uri, ignore_errors=True)


def test_a_corpus_that_does_not_reproduce_the_build_hash_is_refused(runs):
    main, sub, main_data, sub_data = runs
    with pytest.raises(ConfigError, match="reproduces the pretraining corpus"):
        pretraining_texts(main, [sub.data_uri])  # the main model was not built from the sub run's data
