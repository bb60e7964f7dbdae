"""The host-memory tier of the adapter cache: verified adapters loaded from the store on first use.

A request for a user's adapter is answered from host memory when the cached version was checked
against the store less than ``check_ttl_s`` ago; otherwise the store's newest manifest is read,
and a newer version replaces the cached one (no restart needed) while a deleted adapter is
dropped. Concurrent requests for one user share one download, storage I/O runs in a worker
thread off the event loop, transient storage errors are retried with backoff, and the least
recently used adapter leaves first.

An optional ``prepare`` hook runs once when a version enters the host tier; the engine uses it
to keep the adapter as one pinned buffer already laid out like a GPU slot
(``GenerationEngine.prepare_adapter``), so loading it into a slot later is a single copy.
"""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from oppu.errors import AdapterIntegrityError, AdapterNotFound
from oppu.store import AdapterKey, AdapterStore, Manifest

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class CacheRecorder(Protocol):
    def cache_lookup(self, tier: str, hit: bool) -> None: ...
    def adapter_loaded(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class AdapterShape:
    """What a replica's LoRA slots can hold; an adapter outside it is refused as mismatched."""

    base_fingerprint: str
    max_rank: int
    target_modules: tuple[str, ...]


@dataclass
class LoadedAdapter:
    """One verified adapter version in host memory."""

    user: str
    version: str
    manifest: Manifest
    peft_config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    checked_at_s: float = field(default_factory=time.monotonic)
    # The state dict in a model's slot format (``slot_packing.PackedAdapter``), set by the engine.
    packed: Any = None

    @property
    def cache_id(self) -> str:
        return f"{self.user}@{self.version}"


def decode_adapter(manifest: Manifest, files: dict[str, bytes], shape: AdapterShape, *,
                   zero_copy: bool = False) -> LoadedAdapter:
    """Turn a version's verified bytes into tensors, refusing what the replica cannot serve.

    ``zero_copy``: the state dict is a ``slot_packing.SafetensorsFile`` over the downloaded bytes
    (read-only, nothing copied), for a caller that packs it into its own buffer right away
    (``AdapterCache.prepare``).
    """
    from safetensors.torch import load as load_safetensors

    from oppu.serving.slot_packing import SafetensorsFile

    where = f"adapter {manifest.key} version {manifest.version}"
    if manifest.base_fingerprint != shape.base_fingerprint:
        raise AdapterIntegrityError(f"{where}: trained on base {manifest.base_fingerprint}, this "
                                    f"replica serves base {shape.base_fingerprint}")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if name not in files:
            raise AdapterIntegrityError(f"{where}: has no {name}")
    try:
        peft_config = json.loads(files[ADAPTER_CONFIG])
        weights = files[ADAPTER_WEIGHTS]
        state_dict = SafetensorsFile(weights) if zero_copy else load_safetensors(weights)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise AdapterIntegrityError(f"{where}: unreadable adapter files: {exc}") from exc
    # A NaN or inf weight is refused here, before the adapter reaches the host cache or a GPU
    # slot: its own answers would be garbage, and it must not sit among other users' slots.
    from oppu.models.peft_adapters import nonfinite_tensors

    with warnings.catch_warnings():  # zero_copy: read-only views over the bytes, only read here
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        bad = nonfinite_tensors(state_dict)
    if bad:
        raise AdapterIntegrityError(f"{where} (user {manifest.user!r}): {ADAPTER_WEIGHTS} holds NaN or infinite "
                                    f"values in {len(bad)} tensor(s), first {bad[0]!r}; it is not loaded")
    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        raise AdapterIntegrityError(f"{where}: peft_type {peft_config.get('peft_type')!r} is not "
                                    "LORA; only LoRA adapters are served")
    rank = int(peft_config.get("r", 0))
    if not 1 <= rank <= shape.max_rank:
        raise AdapterIntegrityError(f"{where}: LoRA rank {rank} exceeds this replica's "
                                    f"max_lora_rank {shape.max_rank}")
    targets = peft_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unsupported = sorted(set(targets) - set(shape.target_modules))
    if unsupported:
        raise AdapterIntegrityError(f"{where}: targets modules {unsupported} that this replica "
                                    f"has no LoRA slots for (target_modules={list(shape.target_modules)})")
    return LoadedAdapter(user=manifest.user, version=manifest.version, manifest=manifest,
                         peft_config=_lora_config(peft_config, where), state_dict=state_dict)


def _lora_config(raw: dict[str, Any], where: str) -> LoraConfig:
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        return LoraConfig(**{name: value for name, value in raw.items() if name in known})
    except (TypeError, ValueError) as exc:
        raise AdapterIntegrityError(f"{where}: adapter_config.json is not a valid LoRA config: {exc}") from exc


class AdapterCache:
    """LRU of verified adapters in host memory over an ``AdapterStore``; one per replica."""

    def __init__(self, store: AdapterStore, *, task: str, variant: str, shape: AdapterShape,
                 capacity: int, check_ttl_s: float, recorder: CacheRecorder | None = None,
                 on_evict: Callable[[LoadedAdapter], None] | None = None,
                 prepare: Callable[[LoadedAdapter], None] | None = None,
                 retries: int = 3, retry_backoff_s: float = 0.2):
        self.store = store
        self.task, self.variant, self.shape = task, variant, shape
        self.capacity, self.check_ttl_s = capacity, check_ttl_s
        self.recorder, self.on_evict, self.prepare = recorder, on_evict, prepare
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[LoadedAdapter]] = {}

    def key(self, user: str) -> AdapterKey:
        return AdapterKey(self.task, self.shape.base_fingerprint, self.variant, user)

    def cached_users(self) -> list[str]:
        return list(self._entries)

    async def get(self, user: str) -> LoadedAdapter:
        """The user's newest adapter; ``AdapterNotFound`` / ``AdapterIntegrityError`` otherwise."""
        entry = self._entries.get(user)
        if entry is not None and time.monotonic() - entry.checked_at_s < self.check_ttl_s:
            self._entries.move_to_end(user)
            self._record("host", True)
            return entry
        if user in self._inflight:  # someone is already reading this user from the store
            return await asyncio.shield(self._inflight[user])
        future: asyncio.Future[LoadedAdapter] = asyncio.get_running_loop().create_future()
        self._inflight[user] = future
        try:
            loaded = await self._refresh(user, entry)
            future.set_result(loaded)
            return loaded
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: a failure nobody else awaited is not "lost"
            raise
        finally:
            del self._inflight[user]

    def evict(self, user: str) -> bool:
        entry = self._entries.pop(user, None)
        if entry is not None and self.on_evict is not None:
            self.on_evict(entry)
        return entry is not None

    async def _refresh(self, user: str, entry: LoadedAdapter | None) -> LoadedAdapter:
        key = self.key(user)
        if entry is not None:
            newest = await self._with_retries(self.store.latest, key)
            if newest is None:
                self.evict(user)
                raise AdapterNotFound(f"no adapter for user {user!r} ({key})")
            if newest.version == entry.version:
                entry.checked_at_s = time.monotonic()
                self._keep(entry)  # it may have been pushed out while the store was asked
                self._record("host", True)
                return entry
        self._record("host", False)
        started = time.perf_counter()
        try:
            manifest, files = await self._with_retries(self.store.read_files, key)
        except AdapterNotFound:
            self.evict(user)
            raise AdapterNotFound(f"no adapter for user {user!r} ({key})") from None
        loaded = await asyncio.to_thread(self._decode, manifest, files)
        if self.recorder is not None:
            self.recorder.adapter_loaded(time.perf_counter() - started)
        self.evict(user)
        self._keep(loaded)
        return loaded

    def _decode(self, manifest: Manifest, files: dict[str, bytes]) -> LoadedAdapter:
        """Bytes to a verified adapter, prepared for the engine (off the event loop: ~8 MiB of copies)."""
        loaded = decode_adapter(manifest, files, self.shape, zero_copy=self.prepare is not None)
        if self.prepare is not None:
            self.prepare(loaded)  # AdapterError for tensors that do not fit the model's slots
        return loaded

    def _keep(self, adapter: LoadedAdapter) -> None:
        """Hold ``adapter`` as its user's most recently used entry; the oldest beyond capacity leave."""
        self._entries[adapter.user] = adapter
        self._entries.move_to_end(adapter.user)
        while len(self._entries) > self.capacity:
            self.evict(next(iter(self._entries)))

    async def _with_retries(self, func: Callable, *args: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await asyncio.to_thread(func, *args)
            except (AdapterNotFound, AdapterIntegrityError, FileNotFoundError, PermissionError):
                raise
            except OSError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self.retry_backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _record(self, tier: str, hit: bool) -> None:
        if self.recorder is not None:
            self.recorder.cache_lookup(tier, hit)
