"""The store's races and damage (issue #15): gc during a slow publish, versions with a missing or
tampered file, corrupt manifests. Readers fall back to the newest usable version; the
skip-existing check (``find``) treats a broken version as absent, so the next run republishes."""

from __future__ import annotations

import logging

import pytest

from oppu.errors import AdapterError, AdapterIntegrityError
from oppu.store import AdapterKey, AdapterStore, config_hash
from oppu.store.manifest import LEASE_NAME, MANIFEST_NAME
from tests.unit.store.adapter_factory import fake_adapter_dir

TRAIN_CONFIG = {"lr": 1e-4, "epochs": 2}
KEY = AdapterKey("LaMP-2M", "0123456789abcdef", "oppu", "user-1")


def publish(store: AdapterStore, adapter_dir, data_hash: str = "d1"):
    return store.publish(KEY, adapter_dir, data_hash=data_hash, config=TRAIN_CONFIG, peft_method="lora",
                         data_span={"n_items": 3}, metrics={"loss": 0.5})


def gc_mid_publish(store: AdapterStore, collector: AdapterStore, removed: list[int]) -> None:
    """Make ``store``'s publish slow: after its first adapter file, ``collector`` collects garbage
    with no grace period at all (every manifest-less folder is "old")."""
    real = store._fs.pipe_file

    def pipe_file(path, data, **kwargs):
        real(path, data, **kwargs)
        if path.endswith("/adapter_config.json"):
            removed.append(collector.gc_incomplete(older_than_s=-1))

    store._fs.pipe_file = pipe_file


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")  # the moto server of tests/conftest_s3.py


def test_gc_during_a_slow_publish_leaves_the_leased_folder_alone(root, tmp_path):
    store, collector = AdapterStore(root), AdapterStore(root)
    removed: list[int] = []
    gc_mid_publish(store, collector, removed)
    manifest = publish(store, fake_adapter_dir(tmp_path / "a"))
    assert removed == [0]
    assert collector.latest(KEY) == manifest
    assert collector.read_files(KEY)[1]["adapter_model.safetensors"] == b"weights"
    # The lease goes with the publish: the next gc has nothing to keep or remove.
    assert collector.gc_incomplete(older_than_s=-1) == 0
    assert not any(path.endswith(LEASE_NAME) for path in store._fs.find(store._root))


def test_gc_that_ran_anyway_fails_the_publish_and_no_manifest_names_a_missing_file(root, tmp_path):
    store, collector = AdapterStore(root, publish_lease_s=1e-6), AdapterStore(root)  # lease expires at once
    removed: list[int] = []
    gc_mid_publish(store, collector, removed)
    with pytest.raises(AdapterError, match=r"vanished while it was being published.*publish again"):
        publish(store, fake_adapter_dir(tmp_path / "a"))
    assert removed == [1]
    assert collector.latest(KEY) is None and collector.versions(KEY) == []
    assert collector.find(KEY, "d1", config_hash(TRAIN_CONFIG)) is None


def test_gc_keeps_young_folders_and_live_leases_and_removes_expired_ones(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    leased = tmp_path / "store" / KEY.relative_path() / "v20200101T000000000000-0000000a"
    expired = tmp_path / "store" / KEY.relative_path() / "v20200101T000000000000-0000000b"
    unreadable = tmp_path / "store" / KEY.relative_path() / "v20200101T000000000000-0000000c"
    for folder in (leased, expired, unreadable):
        fake_adapter_dir(folder)
    (leased / LEASE_NAME).write_text('{"expires": "2999-01-01T00:00:00+00:00"}')
    (expired / LEASE_NAME).write_text('{"expires": "2020-01-01T00:00:00+00:00"}')
    (unreadable / LEASE_NAME).write_text("{not json")
    assert store.gc_incomplete(older_than_s=3600) == 2
    assert leased.exists() and not expired.exists() and not unreadable.exists()


def test_a_version_with_a_missing_file_falls_back_and_is_republished(root, tmp_path, caplog):
    store = AdapterStore(root)
    old = publish(store, fake_adapter_dir(tmp_path / "a", b"old"), data_hash="d0")
    new = publish(store, fake_adapter_dir(tmp_path / "b", b"new"))
    new_weights = f"{store._root}/{KEY.relative_path()}/{new.version}/adapter_model.safetensors"
    store._fs.rm_file(new_weights)
    caplog.set_level(logging.WARNING, logger="oppu.store")

    reader = AdapterStore(root)
    assert reader.latest(KEY) == old
    assert any(new.version in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)
    assert reader.read_files(KEY)[1]["adapter_model.safetensors"] == b"old"
    # The skip-existing check treats the broken version as absent: the next run trains again ...
    assert reader.find(KEY, "d1", config_hash(TRAIN_CONFIG)) is None
    # ... and its new version is what every reader sees from then on.
    repaired = publish(store, fake_adapter_dir(tmp_path / "c", b"repaired"))
    assert reader.latest(KEY) == repaired == reader.find(KEY, "d1", config_hash(TRAIN_CONFIG))
    assert reader.read_files(KEY)[1]["adapter_model.safetensors"] == b"repaired"


def test_a_tampered_newest_version_is_skipped_by_readers_and_find(root, tmp_path, caplog):
    store = AdapterStore(root)
    old = publish(store, fake_adapter_dir(tmp_path / "a", b"old"))
    new = publish(store, fake_adapter_dir(tmp_path / "b", b"new"))
    store._fs.pipe_file(f"{store._root}/{KEY.relative_path()}/{new.version}/adapter_model.safetensors", b"evil")
    caplog.set_level(logging.WARNING, logger="oppu.store")
    reader = AdapterStore(root)
    assert reader.latest(KEY) == new  # only reading the files can tell
    assert reader.read_files(KEY) == (old, {**reader.read_files(KEY, old.version)[1]})
    assert any("sha256" in r.getMessage() and new.version in r.getMessage() for r in caplog.records)
    assert reader.latest(KEY) == old  # this process knows the newer one is broken now
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors"):
        reader.read_files(KEY, new.version)  # a named version is strict
    # find verifies the hashes of what it would skip on: the old version has the same data and config
    assert AdapterStore(root).find(KEY, "d1", config_hash(TRAIN_CONFIG)) == old
    assert AdapterStore(root).find(KEY, "d1", config_hash(TRAIN_CONFIG), verify=False) == new


@pytest.mark.parametrize("damage", ["not json", "other key", "no files"])
def test_a_corrupt_old_manifest_does_not_block_retraining(root, tmp_path, caplog, damage):
    store = AdapterStore(root)
    old = publish(store, fake_adapter_dir(tmp_path / "a", b"old"), data_hash="d-old")
    new = publish(store, fake_adapter_dir(tmp_path / "b", b"new"), data_hash="d-new")
    manifest_path = f"{store._root}/{KEY.relative_path()}/{old.version}/{MANIFEST_NAME}"
    broken = {"not json": b"{oops",
              "other key": old.to_json().replace(b'"user-1"', b'"user-2"'),
              "no files": old.to_json().replace(b'"files": {', b'"nofiles": {')}[damage]
    store._fs.pipe_file(manifest_path, broken)
    caplog.set_level(logging.WARNING, logger="oppu.store")
    reader = AdapterStore(root)
    # The user's data changed: find walks past the new version to the corrupt old one, and must
    # answer "absent" (train again), naming the file in a warning, never raise.
    assert reader.find(KEY, "d-newer", config_hash(TRAIN_CONFIG)) is None
    assert any(manifest_path in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert reader.find(KEY, "d-new", config_hash(TRAIN_CONFIG)) == new
    assert reader.latest(KEY) == new
    with pytest.raises(AdapterIntegrityError, match="manifest"):
        reader.read_files(KEY, old.version)


def test_a_corrupt_newest_manifest_falls_back_to_the_older_version(root, tmp_path):
    store = AdapterStore(root)
    old = publish(store, fake_adapter_dir(tmp_path / "a", b"old"))
    new = publish(store, fake_adapter_dir(tmp_path / "b", b"new"))
    store._fs.pipe_file(f"{store._root}/{KEY.relative_path()}/{new.version}/{MANIFEST_NAME}", b"[]")
    reader = AdapterStore(root)
    assert reader.latest(KEY) == old == reader.find(KEY, "d1", config_hash(TRAIN_CONFIG))
    assert reader.read_files(KEY)[0] == old


def test_publish_lease_must_be_positive(tmp_path):
    from oppu.errors import ConfigError

    with pytest.raises(ConfigError, match="publish_lease_s"):
        AdapterStore(str(tmp_path), publish_lease_s=0)
