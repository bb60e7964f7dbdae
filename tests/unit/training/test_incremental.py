"""``users.update: incremental`` (issue #17 part 3): a user's current adapter continued on the
history items after the span it was trained on, plus a seeded replay sample of older ones, through
the one train-and-publish path; ``full`` retrains from scratch whatever the store holds."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.tiny_models import build_movie_tag_base, movie_user, one_thread  # noqa: F401
from tests.unit.training.test_users import _batch, _config, _rows, _trainer

pytestmark = pytest.mark.usefixtures("one_thread")

INCREMENTAL = "users.update=incremental"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_movie_tag_base(tmp_path_factory.mktemp("run") / "base")


def _weights(store, key, version):
    from safetensors.torch import load

    return load(store.read_files(key, version)[1]["adapter_model.safetensors"])


def _first_version(base_dir, store_root, *overrides):
    """ann's adapter trained from scratch on her first 8 items; (actor, store, key, manifest)."""
    from oppu.store import AdapterKey, AdapterStore

    actor = _trainer(base_dir, store_root, "per-user", *overrides)
    assert _rows(actor(_batch([movie_user("ann", 8)])))["ann"]["status"] == "trained"
    store = AdapterStore(str(store_root))
    key = AdapterKey("LaMP-2M", actor.fingerprint, "oppu", "ann")
    return actor, store, key, store.latest(key)


def test_incremental_starts_from_the_current_adapter_weights(base_dir, tmp_path):
    """At lr 0 the update is the parent, tensor for tensor: training starts from its weights."""
    import torch

    actor, store, key, parent = _first_version(base_dir, tmp_path / "store", INCREMENTAL)
    actor.publisher.cfg.users.optim.lr = 0.0  # past the config's check (lr > 0): the weights cannot move
    out = _rows(actor(_batch([movie_user("ann", 12)])))["ann"]
    assert out["status"] == "trained" and out["version"] != parent.version
    child = store.latest(key)
    assert child.trainer == "per-user+incremental" and child.data_span["update"]["parent"] == parent.version
    before, after = _weights(store, key, parent.version), _weights(store, key, child.version)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_incremental_trains_the_new_items_and_a_replay_sample_and_records_its_parent(base_dir, tmp_path):
    import torch

    from oppu.user_adapters import version_row

    actor, store, key, parent = _first_version(base_dir, tmp_path / "store", INCREMENTAL,
                                               "users.incremental.replay_ratio=0.5", "users.incremental.epochs=1")
    ann = movie_user("ann", 12)
    out = _rows(actor(_batch([ann])))["ann"]
    child = store.latest(key)
    assert out["samples"] == 4 + 2 == child.metrics["samples"]  # 4 new items, 0.5 replayed per new one
    assert child.metrics["steps"] == 2  # one epoch, batch size 4
    update = child.data_span["update"]
    assert update["parent"] == parent.version and update["parent_items"] == 8 and update["new_items"] == 4
    assert (update["first_new_item_id"], update["last_new_item_id"]) == ("ann-8", "ann-11")
    assert len(update["replay_item_ids"]) == 2 and set(update["replay_item_ids"]) <= {f"ann-{i}" for i in range(8)}
    assert (child.data_span["n_items"], child.data_span["last_item_id"]) == (12, "ann-11")  # what it now covers
    assert child.train_config["update"] == "incremental" and child.train_config["update_epochs"] == 1
    row = version_row(child, current=True)  # what `oppu adapters list` prints
    assert row["trainer"] == "per-user+incremental" and row["data_range"]["update"]["parent"] == parent.version
    before, after = _weights(store, key, parent.version), _weights(store, key, child.version)
    assert any(not torch.equal(before[name], after[name]) for name in before)

    again = _rows(actor(_batch([ann])))["ann"]  # same data, same config: the update is not redone
    assert (again["status"], again["version"]) == ("skipped", child.version)
    ann_more = movie_user("ann", 14)  # and the next update continues this one
    assert _rows(actor(_batch([ann_more])))["ann"]["status"] == "trained"
    assert store.latest(key).data_span["update"]["parent"] == child.version


def test_replay_sample_is_seeded_and_drawn_from_old_items_only():
    from oppu.training.publish import replay_positions

    drawn = replay_positions(40, 10, 0.5, 0, "ann", "v1")
    assert drawn == replay_positions(40, 10, 0.5, 0, "ann", "v1") == sorted(drawn)
    assert len(drawn) == 5 and all(0 <= p < 40 for p in drawn) and len(set(drawn)) == 5
    others = [replay_positions(40, 10, 0.5, seed, user, version)
              for seed, user, version in ((1, "ann", "v1"), (0, "bob", "v1"), (0, "ann", "v2"))]
    assert all(other != drawn for other in others)
    assert replay_positions(3, 10, 0.5, 0, "ann", "v1") == [0, 1, 2]  # at most every old item
    assert replay_positions(40, 10, 0.0, 0, "ann", "v1") == []


def test_full_ignores_the_existing_adapter(base_dir, tmp_path):
    """users.update=full (the default) trains the same adapter whether or not the store held one."""
    import torch

    from oppu.store import AdapterKey, AdapterStore

    actor, store, key, parent = _first_version(base_dir, tmp_path / "store")
    _rows(actor(_batch([movie_user("ann", 12)])))
    retrained = store.latest(key)
    assert retrained.trainer == "per-user" and "update" not in retrained.data_span
    assert retrained.metrics["samples"] == 12
    fresh_actor = _trainer(base_dir, tmp_path / "fresh", "per-user")
    _rows(fresh_actor(_batch([movie_user("ann", 12)])))
    fresh_store = AdapterStore(str(tmp_path / "fresh"))
    fresh = fresh_store.latest(AdapterKey("LaMP-2M", fresh_actor.fingerprint, "oppu", "ann"))
    got, want = _weights(store, key, retrained.version), _weights(fresh_store, fresh.key, fresh.version)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_from_scratch_where_the_current_adapter_cannot_be_continued(base_dir, tmp_path):
    """No new items, an edited history, another LoRA shape: a full retrain, as users.update=full."""
    from oppu.training.publish import AdapterPublisher

    actor, store, key, parent = _first_version(base_dir, tmp_path / "store", INCREMENTAL)
    publisher = actor.publisher
    ann = movie_user("ann", 12)
    assert publisher.update_plan(ann).parent.version == parent.version
    assert publisher.update_plan(movie_user("ann", 8)) is None  # nothing new
    edited = dataclasses.replace(ann, history=[dataclasses.replace(ann.history[0], date="2019-12-31"),
                                               *ann.history[1:]])
    assert publisher.update_plan(edited) is None  # the span it saw is not the start of the history now
    wider = _config(base_dir, tmp_path / "store", "per-user", INCREMENTAL, "users.peft.r=4")
    assert AdapterPublisher.for_run(wider, "oppu", actor.fingerprint, "plain").update_plan(ann) is None
    full = _config(base_dir, tmp_path / "store", "per-user")
    assert AdapterPublisher.for_run(full, "oppu", actor.fingerprint, "plain").update_plan(ann) is None


def test_incremental_needs_the_per_user_trainer(base_dir, tmp_path):
    from oppu.errors import ConfigError

    with pytest.raises(ConfigError, match="users.update=incremental .* per-user trainer only"):
        _config(base_dir, tmp_path / "store", "batched", INCREMENTAL)
