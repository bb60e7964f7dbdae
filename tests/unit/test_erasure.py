"""Erasing a user (``oppu users delete``): nothing of theirs is left, nobody else loses anything,
and the tombstone keeps them from being trained or published again."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from oppu import cli
from oppu.erasure import add_tombstone, is_tombstoned, mention_pattern, remove_tombstone, tombstone_check
from oppu.errors import UserErasedError
from oppu.store import AdapterKey, AdapterStore
from oppu.store.tokens import TokenStore
from tests.unit.store.adapter_factory import fake_adapter_dir

FINGERPRINT = "0123456789abcdef"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A run dir as the stages leave it, less the models: raw LaMP files, prepared data, a
    profiles file, predictions, reports, metrics, a store with adapters and tokens."""
    run = tmp_path_factory.mktemp("run")
    lamp = run / "data" / "lamp"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "12", "--seed", "5", "--n-test", "4",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "4", "--out", str(run / "data")]) == 0
    users = pd.read_parquet(run / "data" / "users.parquet")
    pd.DataFrame({"user_id": users.user_id, "profile": [f"profile of {u}" for u in users.user_id]}).to_parquet(
        run / "data" / "profiles-statistical.parquet")
    test_users = sorted(users[users.role == "test"].user_id)
    queries = {u: [q["id"] for q in json.loads(users.set_index("user_id").queries[u])] for u in test_users}
    (run / "predictions" / "raw").mkdir(parents=True)
    golds = [{"id": q, "output": "comedy"} for u in test_users for q in queries[u]]
    (run / "predictions" / "oppu.json").write_text(json.dumps({"task": "LaMP_2M", "golds": golds}))
    (run / "predictions" / "raw" / "oppu.json").write_text(
        json.dumps({q: " comedy" for u in test_users for q in queries[u]}))
    (run / "reports").mkdir()
    (run / "reports" / "train_users-oppu.json").write_text(json.dumps({
        "variant": "oppu", "trained": 4, "users": [
            {"user_id": u, "status": "trained", "error": "", "loss": 0.1} for u in test_users]}))
    (run / "metrics.json").write_text(json.dumps({"task": "LaMP-2M", "methods": {"oppu": {"accuracy": 0.5}},
                                                  "errors": {"oppu": [f"{test_users[0]}: timed out"]}}))
    (run / "config.yaml").write_text(f"task: LaMP-2M\nusers:\n  users: [{', '.join(test_users)}]\n")
    store = AdapterStore(str(run / "adapters"))
    for user in test_users:
        for task, variant in (("LaMP-2M", "oppu"), ("LaMP-2M", "rag-k1+oppu"), ("LaMP-3", "oppu")):
            store.publish(AdapterKey(task, FINGERPRINT, variant, user),
                          fake_adapter_dir(run / "tmp" / user / task / variant, weights=f"w-{user}".encode()),
                          data_hash="d", config={"r": 8}, peft_method="lora", data_span={"n_items": 1},
                          metrics={"loss": 0.1})
    shutil.rmtree(run / "tmp")
    return run


@pytest.fixture
def run_dir(prepared, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(prepared, copy)
    return copy


def _everything(root: Path) -> dict[str, bytes]:
    """Every file's bytes, Parquet files decoded to text as well (their pages are compressed)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".parquet":
            data += pd.read_parquet(path).to_json().encode()
        out[str(path.relative_to(root))] = data
    return out


def _history_texts(users: pd.DataFrame, user: str) -> set[str]:
    """The user's history texts that no other user has (another's identical text is theirs)."""
    def texts(u):
        return {v for item in json.loads(users.set_index("user_id").history[u])
                for v in item["fields"].values() if isinstance(v, str) and len(v) >= 12}
    others = set().union(*(texts(u) for u in users.user_id if u != user))
    return texts(user) - others


def test_delete_leaves_no_file_mentioning_the_user_and_others_intact(run_dir, capsys):
    users_before = pd.read_parquet(run_dir / "data" / "users.parquet")
    victim, *others = sorted(users_before[users_before.role == "test"].user_id)
    history = _history_texts(users_before, victim)
    assert history  # the synthetic user has texts of their own to look for
    tokens = TokenStore(str(run_dir / "adapters"))
    tokens.create(victim)
    kept_token = tokens.create(others[0])
    before = _everything(run_dir)

    assert cli.main(["users", "delete", "--run", str(run_dir), "--user", victim]) == 0
    assert "adapter version(s)" in capsys.readouterr().err

    after = _everything(run_dir)
    mention = mention_pattern(victim)
    for name, data in after.items():
        assert not mention.search(name.encode()), name
        assert not mention.search(data), f"{name} still mentions {victim}"
        for text in history:
            assert text.encode() not in data, f"{name} still holds a history text of {victim}"
    from oppu.data.dataset import read_dataset

    assert len(read_dataset(run_dir / "data").users) == len(users_before) - 1  # the counts follow
    users_after = pd.read_parquet(run_dir / "data" / "users.parquet")
    expected = users_before[users_before.user_id != victim].reset_index(drop=True)
    pd.testing.assert_frame_equal(users_after.reset_index(drop=True), expected)
    store = AdapterStore(str(run_dir / "adapters"))
    for user in others:  # every other adapter, prediction, token and report entry is still there
        for task, variant in (("LaMP-2M", "oppu"), ("LaMP-2M", "rag-k1+oppu"), ("LaMP-3", "oppu")):
            assert store.users(task, FINGERPRINT, variant).count(user) == 1
        assert re.search(rb'"%s-q0"' % user.encode(), after["predictions/raw/oppu.json"])
    assert tokens.verify(kept_token) == others[0]
    report = json.loads(after["reports/train_users-oppu.json"])
    assert [u["user_id"] for u in report["users"]] == others
    untouched = [n for n in before if not mention.search(n.encode() + before[n]) and "_tombstones" not in n
                 and n != "data/dataset.json"]  # (its user counts follow the table)
    assert untouched and all(after[n] == before[n] for n in untouched)  # files without the user: as they were


def test_erased_users_are_skipped_and_never_published_until_restored(run_dir):
    store_uri = str(run_dir / "adapters")
    victim, other = "user01", "user010"
    assert not is_tombstoned(store_uri, victim)
    add_tombstone(store_uri, victim)
    erased = tombstone_check(store_uri)
    assert erased(victim) and not erased(other) and not erased("user1")
    # The tombstone names a salted hash: the id is written nowhere.
    assert not any(mention_pattern(victim).search(p.name.encode() + p.read_bytes())
                   for p in (run_dir / "adapters" / "_tombstones").iterdir())
    assert remove_tombstone(store_uri, victim) and not is_tombstoned(store_uri, victim)
    assert not remove_tombstone(store_uri, victim)


def _publisher(run_dir: Path):
    from oppu.run_config import RunConfig
    from oppu.training.publish import AdapterPublisher

    cfg = RunConfig(task="LaMP-2M", run_dir=str(run_dir))
    return AdapterPublisher.for_run(cfg, "oppu", FINGERPRINT, "plain")


def _user(user_id: str):
    from oppu.data.records import UserData

    return UserData(user_id=user_id, role="test", history=[], queries=[])


def test_the_publisher_refuses_an_erased_user_and_undoes_a_publish_that_raced_the_delete(run_dir, tmp_path,
                                                                                        monkeypatch):
    from oppu.training.personal import TrainStats

    publisher = _publisher(run_dir)
    store_uri = str(run_dir / "adapters")
    adapter = fake_adapter_dir(tmp_path / "adapter")
    add_tombstone(store_uri, "user90")
    with pytest.raises(UserErasedError, match="user90"):
        publisher.publish(_user("user90"), adapter, TrainStats(samples=1, epochs=1, steps=1))
    assert publisher.store.users("LaMP-2M", FINGERPRINT, "oppu").count("user90") == 0

    original = publisher.store.publish

    def publish_then_get_deleted(*args, **kwargs):
        manifest = original(*args, **kwargs)
        add_tombstone(store_uri, "user91")  # the delete lands while this version is being written
        return manifest

    monkeypatch.setattr(publisher.store, "publish", publish_then_get_deleted)
    with pytest.raises(UserErasedError, match="while"):
        publisher.publish(_user("user91"), adapter, TrainStats(samples=1, epochs=1, steps=1))
    assert publisher.store.users("LaMP-2M", FINGERPRINT, "oppu").count("user91") == 0


def test_restore_command_and_bad_arguments(run_dir, capsys):
    assert cli.main(["users", "delete", "--run", str(run_dir), "--user", "user02"]) == 0
    assert is_tombstoned(str(run_dir / "adapters"), "user02")
    assert cli.main(["users", "restore", "--run", str(run_dir), "--user", "user02"]) == 0
    assert not is_tombstoned(str(run_dir / "adapters"), "user02")
    assert cli.main(["users", "delete", "--run", str(run_dir), "--user", "../etc"]) == 2
    assert cli.main(["users", "delete", "--run", str(run_dir / "nope"), "--user", "u1"]) == 2
