"""Which adapter sits in which LoRA slot of a serving model: the engine's slot cache (LRU).

An adapter is packed once per host-cached version (``oppu.serving.slot_packing``) and loaded
into a free or least recently used slot when a batch needs it; slots that a running row uses
are pinned.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from oppu.errors import AdapterIntegrityError
from oppu.serving.adapters import LoadedAdapter


@dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0


class AdapterSlots:
    """Which adapter version sits in which slot of the multi-LoRA model; LRU replacement.

    Adapters enter slots from their packed form (``slot_packing.PackedAdapter``: one pinned buffer
    in slot format, made once per host-cached version by :meth:`prepare`), so a slot load is one
    asynchronous host-to-device copy and one batched device copy, queued ahead of the batch's
    prefill on the same stream.
    """

    def __init__(self, model: Any, n_slots: int, host_adapters: int = 0):
        from oppu.serving import slot_packing

        self.model = model
        self.n_slots = n_slots
        self.loader = slot_packing.SlotLoader(model)
        # On CUDA, packed adapters live in pooled page-locked buffers (pinning one by one costs
        # milliseconds per adapter); room for the host tier's adapters is pinned up front.
        self.pool = None
        if next(model.parameters()).device.type == "cuda":
            self.pool = slot_packing.PinnedBuffers(self.loader.layout.numel, self.loader.layout.dtype)
            self.pool.reserve(host_adapters)
        self._resident: OrderedDict[str, int] = OrderedDict()  # cache_id -> slot
        self._free = list(range(n_slots))
        self.stats = SlotStats()

    def prepare(self, adapter: LoadedAdapter) -> None:
        """Pack ``adapter`` for this model's slots (once); ``AdapterIntegrityError`` if it does not fit.

        Its ``state_dict`` then shares the packed buffer's memory, so host memory holds one copy.
        """
        from oppu.serving import slot_packing

        packed = adapter.packed
        if packed is not None and packed.layout == self.loader.layout:
            return
        try:
            packed = slot_packing.pack_peft_adapter(self.loader.layout, adapter.state_dict, adapter.peft_config,
                                                    pool=self.pool)
        except Exception as exc:  # whatever the tensors got wrong, it is this adapter's fault
            raise AdapterIntegrityError(f"adapter of user {adapter.user!r} version {adapter.version} does not "
                                        f"fit the base model: {exc}") from exc
        adapter.state_dict = packed.state_dict
        adapter.packed = packed

    def assign(self, adapters: Sequence[LoadedAdapter | None]) -> list[int | Exception]:
        """A slot per row (-1 for the base), loading the adapters not resident yet.

        A row whose adapter cannot be loaded into a slot (tensors that do not fit the model) gets
        the exception instead, so only that row fails.
        """
        needed = {a.cache_id: a for a in adapters if a is not None}
        if len(needed) > self.n_slots:
            raise ValueError(f"a batch uses {len(needed)} adapters but the model has {self.n_slots} slots")
        failures: dict[str, Exception] = {}
        for cache_id, adapter in needed.items():
            if cache_id in self._resident:
                self._resident.move_to_end(cache_id)
                self.stats.hits += 1
                continue
            self.stats.misses += 1
            started = time.perf_counter()
            try:
                self.prepare(adapter)
            except AdapterIntegrityError as exc:
                failures[cache_id] = exc
                continue
            slot = self._take_slot(pinned=needed.keys())
            self.loader.load(slot, adapter.packed)
            self._resident[cache_id] = slot
            self.stats.load_seconds += time.perf_counter() - started
        return [-1 if a is None else failures.get(a.cache_id) or self._resident[a.cache_id]
                for a in adapters]

    def acquire(self, adapter: LoadedAdapter, pinned: Collection[str]) -> int | None:
        """The slot holding ``adapter``, loading it (LRU replacement outside ``pinned``) if needed.

        None when every slot holds a ``pinned`` adapter (the continuous batcher's running, prefilling
        and prefetched sequences); ``AdapterIntegrityError`` when the adapter does not fit.
        """
        cache_id = adapter.cache_id
        if cache_id in self._resident:
            self._resident.move_to_end(cache_id)
            self.stats.hits += 1
            return self._resident[cache_id]
        if not self._free and all(resident in pinned for resident in self._resident):
            return None
        self.stats.misses += 1
        started = time.perf_counter()
        self.prepare(adapter)
        slot = self._take_slot(pinned=pinned)
        self.loader.load(slot, adapter.packed)
        self._resident[cache_id] = slot
        self.stats.load_seconds += time.perf_counter() - started
        return slot

    def release(self, adapter: LoadedAdapter) -> None:
        """Forget an adapter (evicted, deleted or superseded); its slot is overwritten on reuse."""
        slot = self._resident.pop(adapter.cache_id, None)
        if slot is not None:
            self._free.append(slot)

    def resident(self) -> list[str]:
        return list(self._resident)

    def _take_slot(self, pinned) -> int:
        if self._free:
            return self._free.pop()
        for cache_id in self._resident:  # oldest first; rows of this batch keep theirs
            if cache_id not in pinned:
                return self._resident.pop(cache_id)
        raise AssertionError("unreachable: more adapters than slots was checked above")
