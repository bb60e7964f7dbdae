"""Which version is current, and how many are kept (issue #17): rollback, retention."""

from __future__ import annotations

import pytest

from oppu.errors import AdapterError, AdapterIntegrityError, AdapterNotFound, ConfigError
from oppu.store import AdapterKey, AdapterStore
from oppu.store.manifest import ROLLBACK_NAME
from tests.unit.store.adapter_factory import fake_adapter_dir

KEY = AdapterKey("LaMP-2M", "0123456789abcdef", "oppu", "user-1")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")  # the moto server of tests/conftest_s3.py


def publish(store: AdapterStore, tmp_path, n: int, key: AdapterKey = KEY):
    """Version ``n``: its weights file holds ``b"w<n>"``."""
    adapter_dir = fake_adapter_dir(tmp_path / f"{key.user}-{n}", weights=f"w{n}".encode())
    return store.publish(key, adapter_dir, data_hash=f"d{n}", config={"trainer": "batched"} if n == 2 else {},
                         peft_method="lora", data_span={"n_items": n}, metrics={})


def served(store: AdapterStore, key: AdapterKey = KEY) -> tuple[str, bytes]:
    manifest, files = store.read_files(key)
    assert store.latest(key).version == manifest.version
    return manifest.version, files[WEIGHTS]


def test_rollback_is_current_for_every_reader_until_a_later_publish(root, tmp_path):
    store, other_reader = AdapterStore(root), AdapterStore(root)
    v1, v2, v3 = (publish(store, tmp_path, n).version for n in (1, 2, 3))
    assert served(other_reader) == (v3, b"w3")

    assert store.rollback(KEY, v1).version == v1
    assert served(other_reader) == (v1, b"w1")
    assert other_reader.versions(KEY) == [v1, v2, v3]  # nothing deleted

    assert store.rollback(KEY, v2).version == v2  # forward again, within the rolled-back range
    assert served(other_reader) == (v2, b"w2")

    v4 = publish(store, tmp_path, 4).version
    assert served(other_reader) == (v4, b"w4")  # a later publish is current again


def test_a_broken_rolled_back_version_falls_back_to_older_ones_not_to_those_rolled_back_from(root, tmp_path):
    store = AdapterStore(root)
    v1, v2, _ = (publish(store, tmp_path, n).version for n in (1, 2, 3))
    store.rollback(KEY, v2)
    store._fs.pipe_file(f"{store._root}/{KEY}/{v2}/{WEIGHTS}", b"tampered")
    assert AdapterStore(root).read_files(KEY)[0].version == v1


def test_rollback_refuses_unknown_and_broken_versions(root, tmp_path):
    store = AdapterStore(root)
    v1, v2 = (publish(store, tmp_path, n).version for n in (1, 2))
    with pytest.raises(AdapterNotFound, match="no complete version"):
        store.rollback(KEY, "v20000101T000000000000-00000000")
    with pytest.raises(AdapterNotFound, match="not a version id"):
        store.rollback(KEY, "../../x")
    with pytest.raises(AdapterNotFound):
        store.rollback(AdapterKey("LaMP-2M", "0123456789abcdef", "oppu", "nobody"), v1)
    store._fs.pipe_file(f"{store._root}/{KEY}/{v1}/{WEIGHTS}", b"tampered")
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        store.rollback(KEY, v1)
    assert served(AdapterStore(root))[0] == v2  # no rollback record was written
    assert not store._fs.exists(f"{store._root}/{KEY}/{ROLLBACK_NAME}")


def test_rollback_that_loses_the_race_to_a_publish_says_so(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    v1 = publish(store, tmp_path, 1).version
    publish(store, tmp_path, 2)
    real_latest = store.latest

    def publish_then_latest(key):  # v3 lands between the rollback's record and its check
        store.latest = real_latest
        v3 = publish(store, tmp_path, 3).version
        assert real_latest(key).version == v3
        return real_latest(key)

    store.latest = publish_then_latest
    with pytest.raises(AdapterError, match="published meanwhile"):
        store.rollback(KEY, v1)


def test_an_unreadable_rollback_record_is_ignored(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    _, v2 = (publish(store, tmp_path, n).version for n in (1, 2))
    store._fs.pipe_file(f"{store._root}/{KEY}/{ROLLBACK_NAME}", b"{not json")
    assert served(store)[0] == v2


def test_retention_keeps_the_newest_k_after_each_publish(root, tmp_path):
    store = AdapterStore(root, keep_versions=2)
    versions = [publish(store, tmp_path, n).version for n in range(1, 5)]
    assert store.versions(KEY) == versions[-2:]
    assert served(store) == (versions[-1], b"w4")
    neighbour = AdapterKey("LaMP-2M", "0123456789abcdef", "oppu", "user-2")
    publish(store, tmp_path, 9, key=neighbour)
    assert store.versions(KEY) == versions[-2:]  # one user's publish prunes only that user


def test_retention_never_deletes_the_current_version(root, tmp_path):
    store = AdapterStore(root)
    v1, v2, v3 = (publish(store, tmp_path, n).version for n in (1, 2, 3))
    store.rollback(KEY, v1)
    assert store.prune(KEY, 1) == [v2]  # v3 is the newest, v1 what a rollback made current
    assert store.versions(KEY) == [v1, v3] and served(store) == (v1, b"w1")

    # A publish makes the new version current, so the rolled-back one may go then.
    keeping = AdapterStore(root, keep_versions=2)
    v4 = publish(keeping, tmp_path, 4).version
    assert keeping.versions(KEY) == [v3, v4] and served(keeping) == (v4, b"w4")


def test_retention_and_prune_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="keep_versions must be >= 1"):
        AdapterStore(str(tmp_path), keep_versions=0)
    with pytest.raises(ConfigError, match="keep must be >= 1"):
        AdapterStore(str(tmp_path)).prune(KEY, 0)


def test_the_rollback_record_is_not_a_version_or_a_user(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    v1, _ = (publish(store, tmp_path, n).version for n in (1, 2))
    store.rollback(KEY, v1)
    assert store.users("LaMP-2M", "0123456789abcdef", "oppu") == ["user-1"]
    assert store.gc_incomplete(older_than_s=-1) == 0
    assert store._fs.exists(f"{store._root}/{KEY}/{ROLLBACK_NAME}")
    assert store.delete_user("user-1") == 2  # versions, not the record
    assert store.latest(KEY) is None


def test_trainer_is_per_user_unless_the_train_config_says_otherwise(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    assert publish(store, tmp_path, 1).trainer == "per-user"
    assert publish(store, tmp_path, 2).trainer == "batched"
