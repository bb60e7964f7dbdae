"""The adapter and token stores against a real S3-protocol server (moto) through ``s3://`` URIs."""

from __future__ import annotations

import pytest

from oppu.errors import AdapterIntegrityError
from oppu.store import AdapterKey, AdapterStore, TokenStore, config_hash
from oppu.store.manifest import new_version_id
from tests.unit.store.adapter_factory import (
    assert_same_lora_weights,
    fake_adapter_dir,
    make_tiny_peft_adapter,
)

pytestmark = pytest.mark.integration

KEY = AdapterKey("LaMP-2M", "0123456789abcdef", "rag-k1+oppu", "310")
TRAIN_CONFIG = {"lr": 1e-4, "epochs": 2}


def publish(store: AdapterStore, key: AdapterKey, adapter_dir, data_hash: str = "d1"):
    return store.publish(key, adapter_dir, data_hash=data_hash, config=TRAIN_CONFIG, peft_method="lora",
                         data_span={"n_items": 3}, metrics={"loss": 0.5})


def test_peft_round_trip_through_s3_with_endpoint_from_environment(s3_uri, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    trained = make_tiny_peft_adapter(tmp_path / "adapter")
    store = AdapterStore(s3_uri)  # endpoint and credentials: AWS_* set by the s3_server fixture
    manifest = publish(store, KEY, tmp_path / "adapter")

    # A second instance stands in for the serving process: it must see the new version.
    reader = AdapterStore(s3_uri)
    assert reader.latest(KEY) == manifest
    assert reader.find(KEY, "d1", config_hash(TRAIN_CONFIG)) == manifest
    assert reader.users(KEY.task, KEY.base_fingerprint, KEY.variant) == ["310"]
    fetched = reader.fetch(KEY, tmp_path / "fetched")
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(trained.base_model.model.config), fetched)
    assert_same_lora_weights(trained, loaded)


def test_versions_integrity_and_deletion_on_s3(s3_server, s3_uri, tmp_path):
    import fsspec

    store = AdapterStore(s3_uri, storage_options=s3_server["storage_options"])
    first = publish(store, KEY, fake_adapter_dir(tmp_path / "a", b"first"))
    second = publish(store, KEY, fake_adapter_dir(tmp_path / "b", b"second"))
    # "3100" shares the prefix "310": listings must stop at the "/" after the user id.
    neighbour = AdapterKey(KEY.task, KEY.base_fingerprint, KEY.variant, "3100")
    neighbour_manifest = publish(store, neighbour, fake_adapter_dir(tmp_path / "n", b"neighbour"))
    s3 = fsspec.filesystem("s3", **s3_server["storage_options"])
    key_prefix = f"{s3_uri.removeprefix('s3://')}/{KEY.relative_path()}"
    # A crashed writer: objects without a manifest, under a newer version id.
    s3.pipe_file(f"{key_prefix}/{new_version_id()}/adapter_model.safetensors", b"half")

    assert store.versions(KEY) == [first.version, second.version]
    assert store.read_files(KEY)[1]["adapter_model.safetensors"] == b"second"

    s3.pipe_file(f"{key_prefix}/{second.version}/adapter_model.safetensors", b"evil")
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors"):
        store.read_files(KEY, second.version)
    # Without a version, readers fall back to the newest version that verifies.
    assert store.read_files(KEY)[1]["adapter_model.safetensors"] == b"first"
    s3.rm_file(f"{key_prefix}/{second.version}/adapter_model.safetensors")
    with pytest.raises(AdapterIntegrityError, match="missing"):
        store.read_files(KEY, second.version)
    assert AdapterStore(s3_uri).latest(KEY) == first
    assert store.read_files(KEY, first.version)[1]["adapter_model.safetensors"] == b"first"

    assert store.gc_incomplete(older_than_s=-1) == 1
    assert store.delete_user("310") == 2
    assert store.latest(KEY) is None and not s3.find(key_prefix)
    assert store.versions(neighbour) == [neighbour_manifest.version]
    assert store.users(KEY.task, KEY.base_fingerprint, KEY.variant) == ["3100"]


def test_tokens_on_s3(s3_uri):
    tokens = TokenStore(s3_uri)
    token = tokens.create("310")
    assert TokenStore(s3_uri).verify(token) == "310"
    rotated = tokens.rotate("310")
    assert tokens.verify(token) is None and tokens.verify(rotated) == "310"
    assert tokens.revoke("310") == 1 and tokens.verify(rotated) is None
