"""AdapterStore on a local directory: round trip with a real PEFT adapter, versions, integrity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oppu.errors import AdapterError, AdapterIntegrityError, AdapterNotFound, ConfigError, UserIdError
from oppu.store import AdapterKey, AdapterStore, config_hash
from oppu.store.manifest import MANIFEST_NAME, new_version_id
from tests.unit.store.adapter_factory import (
    assert_same_lora_weights,
    fake_adapter_dir,
    make_tiny_peft_adapter,
)

TRAIN_CONFIG = {"lr": 1e-4, "epochs": 2, "peft": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> tuple[Path, object]:
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model = make_tiny_peft_adapter(adapter_dir)
    return adapter_dir, model


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(str(tmp_path / "store"))


def publish(store: AdapterStore, key: AdapterKey, adapter_dir: Path, data_hash: str = "d1",
            config: dict | None = None):
    return store.publish(key, adapter_dir, data_hash=data_hash, config=config or TRAIN_CONFIG,
                         peft_method="lora", data_span={"n_items": 3}, metrics={"loss": 0.5})


KEY = AdapterKey("LaMP-2M", "0123456789abcdef", "oppu", "user-1")


def test_round_trip_of_a_real_peft_adapter_loads_with_peft(store, tiny_adapter, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter_dir, trained = tiny_adapter
    manifest = publish(store, KEY, adapter_dir)
    assert set(manifest.files) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert manifest.peft_config["r"] == 2 and manifest.config_hash == config_hash(TRAIN_CONFIG)

    fetched = store.fetch(KEY, tmp_path / "fetched")
    assert json.loads((fetched / MANIFEST_NAME).read_text())["version"] == manifest.version
    base = LlamaForCausalLM(trained.base_model.model.config)
    loaded = PeftModel.from_pretrained(base, fetched)
    assert_same_lora_weights(trained, loaded)

    read_manifest, files = store.read_files(KEY)
    assert read_manifest == manifest
    assert files["adapter_model.safetensors"] == (adapter_dir / "adapter_model.safetensors").read_bytes()


def test_newest_complete_version_wins_and_incomplete_is_invisible(store, tmp_path):
    first = publish(store, KEY, fake_adapter_dir(tmp_path / "a", b"first"))
    second = publish(store, KEY, fake_adapter_dir(tmp_path / "b", b"second"))
    assert second.version > first.version
    # A crashed writer's folder: files but no manifest, with a newer version id.
    crashed = tmp_path / "store" / KEY.relative_path() / new_version_id()
    fake_adapter_dir(crashed, b"half")

    assert store.versions(KEY) == [first.version, second.version]
    assert store.latest(KEY).version == second.version
    assert store.read_files(KEY)[1]["adapter_model.safetensors"] == b"second"
    assert store.read_files(KEY, first.version)[1]["adapter_model.safetensors"] == b"first"
    with pytest.raises(AdapterNotFound):
        store.read_files(KEY, crashed.name)


def test_concurrent_publishes_of_one_key_get_distinct_versions(store, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    dirs = [fake_adapter_dir(tmp_path / str(i), bytes([i])) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        manifests = list(pool.map(lambda d: publish(store, KEY, d), dirs))
    assert len({m.version for m in manifests}) == 8
    assert store.versions(KEY) == sorted(m.version for m in manifests)
    for i, manifest in enumerate(manifests):
        assert store.read_files(KEY, manifest.version)[1]["adapter_model.safetensors"] == bytes([i])


def test_tampered_or_missing_file_is_refused_naming_file_and_key(store, tmp_path):
    manifest = publish(store, KEY, fake_adapter_dir(tmp_path / "a"))
    version_dir = tmp_path / "store" / KEY.relative_path() / manifest.version
    (version_dir / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(AdapterIntegrityError, match=r"adapter_model\.safetensors"):
        store.read_files(KEY)
    dest = tmp_path / "dest"
    with pytest.raises(AdapterIntegrityError) as raised:
        store.fetch(KEY, dest)
    assert "adapter_model.safetensors" in str(raised.value) and str(KEY) in str(raised.value)
    assert not dest.exists()

    (version_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterIntegrityError, match="missing"):
        store.read_files(KEY)


def test_manifest_that_describes_another_key_is_refused(store, tmp_path):
    manifest = publish(store, KEY, fake_adapter_dir(tmp_path / "a"))
    other = AdapterKey(KEY.task, "fedcba9876543210", KEY.variant, KEY.user)
    src = tmp_path / "store" / KEY.relative_path() / manifest.version
    dst = tmp_path / "store" / other.relative_path() / manifest.version
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    with pytest.raises(AdapterIntegrityError, match="not the folder"):
        store.read_files(other)


def test_missing_adapter_raises_not_found(store):
    assert store.latest(KEY) is None and store.versions(KEY) == []
    with pytest.raises(AdapterNotFound, match="user-1"):
        store.fetch(KEY)


def test_find_matches_data_and_config(store, tmp_path):
    adapter_dir = fake_adapter_dir(tmp_path / "a")
    old = publish(store, KEY, adapter_dir, data_hash="d1")
    publish(store, KEY, adapter_dir, data_hash="d2")
    assert store.find(KEY, "d1", config_hash(TRAIN_CONFIG)).version == old.version
    assert store.find(KEY, "d1", config_hash({**TRAIN_CONFIG, "lr": 2e-4})) is None
    assert store.find(KEY, "d3", config_hash(TRAIN_CONFIG)) is None
    # Key order does not change the hash: configs are compared as canonical JSON.
    assert config_hash(dict(reversed(list(TRAIN_CONFIG.items())))) == config_hash(TRAIN_CONFIG)


def test_users_lists_only_users_with_a_complete_version(store, tmp_path):
    adapter_dir = fake_adapter_dir(tmp_path / "a")
    for user in ("u2", "u1"):
        publish(store, AdapterKey(KEY.task, KEY.base_fingerprint, KEY.variant, user), adapter_dir)
    publish(store, AdapterKey(KEY.task, KEY.base_fingerprint, "rag-k1+oppu", "u3"), adapter_dir)
    fake_adapter_dir(tmp_path / "store" / KEY.task / KEY.base_fingerprint / "oppu" / "u4" / new_version_id())
    assert store.users(KEY.task, KEY.base_fingerprint, "oppu") == ["u1", "u2"]
    assert store.users(KEY.task, KEY.base_fingerprint, "rag-k1+oppu") == ["u3"]


def test_delete_user_removes_every_version_of_every_adapter(store, tmp_path):
    adapter_dir = fake_adapter_dir(tmp_path / "a")
    mine = [AdapterKey("LaMP-2M", "f1", "oppu", "u1"), AdapterKey("LaMP-2M", "f1", "rag-k1+oppu", "u1"),
            AdapterKey("LaMP-3", "f2", "oppu", "u1")]
    for key in mine:
        publish(store, key, adapter_dir)
    publish(store, mine[0], adapter_dir)
    theirs = AdapterKey("LaMP-2M", "f1", "oppu", "u10")
    publish(store, theirs, adapter_dir)

    assert store.delete_user("u1", task="LaMP-3") == 1
    assert store.latest(mine[2]) is None and store.latest(mine[0]) is not None
    assert store.delete_user("u1") == 3
    assert all(store.latest(key) is None for key in mine)
    assert not any(p.name == "u1" for p in (tmp_path / "store").rglob("*"))
    assert store.latest(theirs) is not None
    assert store.delete_user("u1") == 0


def test_gc_removes_only_old_folders_without_manifest(store, tmp_path):
    from datetime import UTC, datetime, timedelta

    complete = publish(store, KEY, fake_adapter_dir(tmp_path / "a"))
    key_dir = tmp_path / "store" / KEY.relative_path()
    old = fake_adapter_dir(key_dir / new_version_id(datetime.now(UTC) - timedelta(hours=2)))
    empty_old = key_dir / new_version_id(datetime.now(UTC) - timedelta(hours=3))
    empty_old.mkdir()
    young = fake_adapter_dir(key_dir / new_version_id())
    assert store.gc_incomplete(older_than_s=3600) == 2
    assert not old.exists() and not empty_old.exists() and young.exists()
    assert store.versions(KEY) == [complete.version]


@pytest.mark.parametrize("user", ["../x", "a/b", "a:b", "x" * 129, "", ".", "..", "a b"])
def test_invalid_user_ids_are_refused_before_any_path_is_built(store, user, tmp_path):
    with pytest.raises(UserIdError):
        AdapterKey("LaMP-2M", "f1", "oppu", user)
    with pytest.raises(UserIdError):
        store.delete_user(user)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(("task", "fingerprint", "variant"), [
    ("../LaMP", "f1", "oppu"), ("LaMP-2M", "a/b", "oppu"), ("LaMP-2M", "f1", "rag:k1"),
    ("_auth", "f1", "oppu"), ("LaMP-2M", "..", "oppu"), ("LaMP-2M", "f1", "+oppu")])
def test_invalid_key_parts_are_refused(task, fingerprint, variant):
    with pytest.raises(ConfigError, match="invalid adapter"):
        AdapterKey(task, fingerprint, variant, "u1")


def test_numeric_lamp_user_ids_and_plus_variants_are_accepted():
    key = AdapterKey("LaMP-2M", "0123456789abcdef", "rag-k1+oppu", 310)
    assert key.user == "310" and key.relative_path() == "LaMP-2M/0123456789abcdef/rag-k1+oppu/310"


def test_file_uri_root_is_the_same_store(tmp_path):
    adapter_dir = fake_adapter_dir(tmp_path / "a")
    manifest = publish(AdapterStore(f"file://{tmp_path}/store"), KEY, adapter_dir)
    assert AdapterStore(str(tmp_path / "store")).latest(KEY) == manifest


@pytest.mark.parametrize(("field", "value"), [
    ("files", {"../../outside.txt": "0" * 64}), ("files", {"/etc/passwd": "0" * 64}),
    ("files", {"adapter_model.safetensors": "not-a-sha"}), ("files", {}),
    ("format_version", 99), ("version", None)])
def test_forged_manifest_is_refused_before_anything_is_written(store, tmp_path, field, value):
    manifest = publish(store, KEY, fake_adapter_dir(tmp_path / "a"))
    manifest_path = tmp_path / "store" / KEY.relative_path() / manifest.version / MANIFEST_NAME
    raw = json.loads(manifest_path.read_text())
    if value is None:
        del raw[field]
    else:
        raw[field] = value
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(AdapterIntegrityError, match=str(KEY)):
        store.fetch(KEY, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "outside.txt").exists()


def test_publish_refuses_a_directory_without_adapter_config(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        publish(store, KEY, tmp_path / "empty")
    assert store.versions(KEY) == []


def test_publish_refuses_non_finite_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 4),
               "base_model.model.q_proj.lora_B.weight": torch.tensor([[float("inf"), 0.0]] * 4)},
              str(adapter_dir / "adapter_model.safetensors"))
    store = AdapterStore(str(tmp_path / "store"))
    with pytest.raises(AdapterError, match=r"user 'user-1'.*adapter_model\.safetensors.*q_proj\.lora_B"):
        store.publish(KEY, adapter_dir, data_hash="d", config={}, peft_method="lora", data_span={}, metrics={})
    assert store.versions(KEY) == []
