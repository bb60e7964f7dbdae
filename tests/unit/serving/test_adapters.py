"""The host adapter cache: one download for concurrent requests, TTL re-checks, new versions, LRU."""

from __future__ import annotations

import asyncio
import threading

import pytest

from oppu.errors import AdapterNotFound
from oppu.serving.adapters import AdapterCache, AdapterShape
from oppu.store import AdapterKey, AdapterStore
from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    make_user_adapter,
    publish_adapter,
    reseeded_adapter,
)

FINGERPRINT = "tinybase00000000"
SHAPE = AdapterShape(FINGERPRINT, max_rank=8, target_modules=("q_proj", "v_proj"))


class CountingStore(AdapterStore):
    """The real file store, counting reads (and slowing them so concurrent callers overlap)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.reads: list[str] = []
        self._lock = threading.Lock()

    def read_files(self, key, version=None):
        with self._lock:
            self.reads.append(key.user)
        threading.Event().wait(0.05)
        return super().read_files(key, version)


@pytest.fixture(scope="module")
def store_with_users(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    base = build_tiny_base(root / "base")
    template = make_user_adapter(base, root / "template", seed=0)
    store = AdapterStore(str(root / "store"))
    for i, user in enumerate(["u1", "u2", "u3"]):
        publish_adapter(store, "LaMP-3", FINGERPRINT, user, reseeded_adapter(template, root / user, seed=i))
    return root, template


def make_cache(root, capacity=2, ttl_s=60.0, evicted=None):
    return AdapterCache(CountingStore(str(root / "store")), task="LaMP-3", variant="oppu", shape=SHAPE,
                        capacity=capacity, check_ttl_s=ttl_s, on_evict=(evicted.append if evicted is not None else None))


def test_concurrent_requests_share_one_download_and_lru_evicts_oldest(store_with_users):
    root, _ = store_with_users
    evicted = []
    cache = make_cache(root, evicted=evicted)

    async def scenario():
        first = await asyncio.gather(*(cache.get("u1") for _ in range(5)))
        await cache.get("u2")
        await cache.get("u1")  # u1 becomes the most recent
        await cache.get("u3")  # so u2 leaves
        return first

    first = asyncio.run(scenario())
    assert all(adapter is first[0] for adapter in first)
    assert cache.store.reads == ["u1", "u2", "u3"]
    assert cache.cached_users() == ["u1", "u3"] and [a.user for a in evicted] == ["u2"]
    assert set(first[0].state_dict) and first[0].peft_config.r == 4


def test_newer_version_replaces_cached_one_and_deletion_is_noticed_after_ttl(store_with_users):
    root, template = store_with_users
    cache = make_cache(root, ttl_s=0.0)
    store = AdapterStore(str(root / "store"))
    old = asyncio.run(cache.get("u1"))
    assert asyncio.run(cache.get("u1")) is old  # re-checked, same version: no download
    assert cache.store.reads == ["u1"]
    newer = publish_adapter(store, "LaMP-3", FINGERPRINT, "u1", reseeded_adapter(template, root / "u1-v2", seed=42))
    assert asyncio.run(cache.get("u1")).version == newer.version != old.version
    store.delete_user("u1")
    with pytest.raises(AdapterNotFound):
        asyncio.run(cache.get("u1"))
    assert "u1" not in cache.cached_users()
    with pytest.raises(AdapterNotFound):
        asyncio.run(cache.get("nobody"))


def test_key_uses_the_replicas_base_fingerprint(store_with_users):
    root, _ = store_with_users
    assert make_cache(root).key("u2") == AdapterKey("LaMP-3", FINGERPRINT, "oppu", "u2")
