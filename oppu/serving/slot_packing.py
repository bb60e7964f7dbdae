"""Serving's way into multi-LoRA slots: adapters packed once into a slot's flat layout, loaded in one copy.

A replica fetches a user's adapter as safetensors bytes (:class:`SafetensorsFile` reads them in
place), packs it into the model's slot format (:class:`SlotLayout`, :func:`pack_peft_adapter`)
in a page-locked host buffer (:class:`PinnedBuffers`), and :class:`SlotLoader` puts it into a
slot of the model's ``MultiLoraLinear`` layers (``oppu.models.multi_lora``) with one
host-to-device copy. Checks match ``multi_lora.load_peft_adapter_into_slot``'s: the same adapter
is refused by both, with the same ``AdapterError``.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from oppu.errors import AdapterError
from oppu.models.multi_lora import (
    adapter_matrices,
    check_supported,
    checked_pair,
    multi_lora_layers,
    parse_peft_key,
    peft_scaling,
)

if TYPE_CHECKING:
    from peft import LoraConfig


@dataclass(frozen=True)
class SlotLayout:
    """How one adapter slot of a model is laid out as one flat buffer ("slot format").

    Layer by layer in ``names`` order: the slot's ``lora_A`` block (``rank x in``) then its
    ``lora_B`` block (``out x rank``), exactly as ``layer.lora_A[slot]`` / ``layer.lora_B[slot]``
    hold them, so loading a slot is a plain copy of each block.
    """

    names: tuple[str, ...]
    features: tuple[tuple[int, int], ...]  # (in_features, out_features) per layer
    rank: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> SlotLayout:
        layers = multi_lora_layers(model)
        if not layers:
            raise ValueError("the model has no multi-LoRA layers: call inject_multi_lora first")
        first = next(iter(layers.values()))
        return cls(names=tuple(layers),
                   features=tuple((layer.in_features, layer.out_features) for layer in layers.values()),
                   rank=first.rank, dtype=first.lora_A.dtype)

    @functools.cached_property
    def blocks(self) -> tuple[tuple[int, int, int], ...]:
        """Per layer, in elements: (offset of its A block, offset of its B block, end)."""
        blocks, offset = [], 0
        for in_features, out_features in self.features:
            a_end = offset + self.rank * in_features
            blocks.append((offset, a_end, a_end + out_features * self.rank))
            offset = blocks[-1][2]
        return tuple(blocks)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @property
    def numel(self) -> int:
        return self.blocks[-1][2] if self.blocks else 0

    def block(self, buffer: torch.Tensor, layer: int, matrix: str) -> torch.Tensor:
        """Layer ``layer``'s ``lora_A`` (``rank x in``) or ``lora_B`` (``out x rank``) block of ``buffer``."""
        a, b, end = self.blocks[layer]
        in_features, out_features = self.features[layer]
        if matrix == "lora_A":
            return buffer[a:b].view(self.rank, in_features)
        return buffer[b:end].view(out_features, self.rank)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """``buffer``'s blocks as ``[A_0, B_0, A_1, B_1, ...]`` shaped like one slot of each layer."""
        return [self.block(buffer, i, matrix) for i in range(len(self.names)) for matrix in ("lora_A", "lora_B")]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the file
    end: int


class SafetensorsFile(Mapping):
    """A safetensors file's float tensors over its bytes, nothing copied; checked as the format defines.

    Reading an item gives a read-only view over ``data`` (never write to it). Malformed files
    (header length, JSON, dtypes, byte ranges that do not hold the shapes) raise ``ValueError``.
    :func:`pack_peft_adapter` copies from the bytes directly, without making these views.
    """

    def __init__(self, data: bytes):
        if len(data) < 8:
            raise ValueError("shorter than the 8-byte header length")
        header_len = int.from_bytes(data[:8], "little")
        if not 2 <= header_len <= len(data) - 8:
            raise ValueError(f"header length {header_len} does not fit a {len(data)}-byte file")
        try:
            header = json.loads(data[8:8 + header_len])
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        start, size = 8 + header_len, len(data) - 8 - header_len
        self.data = data
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                shape, (begin, end) = tuple(map(int, info["shape"])), map(int, info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"tensor {name!r}: header entry {info!r} is malformed ({exc!r})") from None
            if dtype is None:
                raise ValueError(f"tensor {name!r}: dtype {info.get('dtype')!r} is not a float dtype")
            if (min(shape, default=0) < 0 or not 0 <= begin <= end <= size
                    or end - begin != math.prod(shape) * dtype.itemsize):
                raise ValueError(f"tensor {name!r}: bytes {begin}..{end} do not hold shape {list(shape)} of {dtype}")
            self.entries[name] = _Entry(dtype, shape, start + begin, start + end)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        count = math.prod(entry.shape)
        if not count:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(self.data, dtype=entry.dtype, count=count, offset=entry.begin).view(entry.shape)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


# torch warns that bytes are not writable; SafetensorsFile's views are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=r"oppu\.serving\.slot_packing")


class _BlockViews(Mapping):
    """A packed adapter's PEFT state dict: each key's tensor as a view into the packed buffer, made on access."""

    def __init__(self, layout: SlotLayout, buffer: torch.Tensor, where: dict[str, tuple[int, str, int]],
                 copies: dict[str, torch.Tensor]):
        self._layout, self._buffer, self._where, self._copies = layout, buffer, where, copies

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._copies:
            return self._copies[key]
        layer, matrix, rank = self._where[key]
        block = self._layout.block(self._buffer, layer, matrix)
        return block[:rank] if matrix == "lora_A" else block[:, :rank]

    def __iter__(self):
        yield from self._where
        yield from self._copies

    def __len__(self) -> int:
        return len(self._where) + len(self._copies)


@dataclass(frozen=True)
class PackedAdapter:
    """A PEFT adapter converted once into ``layout``'s slot format: one flat (pinned) buffer.

    ``state_dict`` is the adapter's PEFT state dict again, as views into ``buffer`` (tensors of
    another dtype than the slots' are kept as copies), so the host holds one copy of it.
    """

    layout: SlotLayout
    buffer: torch.Tensor
    scaling: float
    state_dict: Mapping
    # The device copies that read ``buffer`` last (a CUDA event, set by SlotLoader.load): a pooled
    # buffer is reused only once they are done.
    last_read: list = field(default_factory=lambda: [None], compare=False, repr=False)


class PinnedBuffers:
    """Page-locked host buffers of one size, carved from large slabs and reused.

    Pinning memory is slow per call (``cudaHostAlloc`` locks every page: milliseconds for one
    adapter), so buffers come ``per_slab`` at a time and go back to the pool when the
    :class:`PackedAdapter` holding one is garbage-collected, after the device copies that read it
    have finished. Thread-safe (adapters are packed in worker threads).
    """

    def __init__(self, numel: int, dtype: torch.dtype, per_slab: int = 32):
        self.numel, self.dtype, self.per_slab = numel, dtype, per_slab
        self._free: list[tuple[torch.Tensor, list]] = []
        self._lock = threading.Lock()
        self.slabs = 0

    def reserve(self, n: int) -> None:
        """Pin room for at least ``n`` buffers now (at start, off the request path)."""
        with self._lock:
            while len(self._free) < n:
                self._grow(min(self.per_slab, n - len(self._free)))

    def take(self) -> torch.Tensor:
        with self._lock:
            if not self._free:
                self._grow(self.per_slab)
            buffer, last_read = self._free.pop()
        if last_read[0] is not None:
            last_read[0].synchronize()
        return buffer

    def _grow(self, n: int) -> None:
        slab = torch.empty(n * self.numel, dtype=self.dtype, pin_memory=True)
        self._free.extend((slab[i * self.numel:(i + 1) * self.numel], [None]) for i in range(n))
        self.slabs += 1

    def give_back(self, buffer: torch.Tensor, last_read: list | None = None) -> None:
        with self._lock:
            self._free.append((buffer, last_read or [None]))

    def adopt(self, packed: PackedAdapter) -> None:
        """Return ``packed.buffer`` (taken from this pool) once ``packed`` is collected."""
        weakref.finalize(packed, self.give_back, packed.buffer, packed.last_read)


def pack_peft_adapter(layout: SlotLayout, peft_state_dict: Mapping, peft_config: LoraConfig,
                      *, pin_memory: bool = False, pool: PinnedBuffers | None = None) -> PackedAdapter:
    """Check a PEFT LoRA adapter against ``layout`` and copy it into one slot-format buffer.

    Raises ``AdapterError`` for what :func:`load_peft_adapter_into_slot` refuses (unsupported
    config, a key naming no layer, a missing matrix, a rank or shape the layer cannot take).
    Layers the adapter does not cover, and ranks below the slots', are zero-filled.
    ``pin_memory`` puts the buffer in page-locked memory, so a load is one asynchronous copy;
    ``pool`` takes it from pooled page-locked buffers instead (see :class:`PinnedBuffers`).
    From a :class:`SafetensorsFile`, matrices already in the slots' dtype and rank are copied
    straight from the file's bytes (one memcpy each, no tensor objects); the rest through torch.
    """
    check_supported(peft_config)
    index = layout.index
    raw = peft_state_dict.entries if isinstance(peft_state_dict, SafetensorsFile) else peft_state_dict
    matrices = adapter_matrices(raw, index)
    keys = {parse_peft_key(key): key for key in raw}
    if pool is not None and (pool.numel, pool.dtype) != (layout.numel, layout.dtype):
        raise ValueError("the pool's buffers do not have the layout's size and dtype")
    buffer = pool.take() if pool is not None else torch.empty(layout.numel, dtype=layout.dtype,
                                                                pin_memory=pin_memory)
    try:
        item = buffer.element_size()
        byte_copies: list[tuple[int, int, int]] = []  # (buffer byte offset, file byte offset, length)
        targets, sources, zeros = [], [], []
        where: dict[str, tuple[int, str, int]] = {}
        copies: dict[str, torch.Tensor] = {}
        for i, name in enumerate(layout.names):
            a_at, b_at, _ = layout.blocks[i]
            pair = matrices.get(name)
            if pair is None:
                zeros += [layout.block(buffer, i, "lora_A"), layout.block(buffer, i, "lora_B")]
                continue
            in_features, out_features = layout.features[i]
            lora_a, lora_b = checked_pair(name, pair, layout.rank, in_features, out_features)
            rank = lora_a.shape[0]
            for matrix, at, source in (("lora_A", a_at, lora_a), ("lora_B", b_at, lora_b)):
                key = keys[name, matrix]
                if source.dtype != layout.dtype:
                    copies[key] = peft_state_dict[key].clone()
                else:
                    where[key] = (i, matrix, rank)
                if isinstance(source, _Entry) and source.dtype == layout.dtype and rank == layout.rank:
                    byte_copies.append((at * item, source.begin, source.end - source.begin))
                    continue
                block = layout.block(buffer, i, matrix)
                if matrix == "lora_A":
                    targets.append(block[:rank])
                    zeros += [block[rank:]] if rank < layout.rank else []
                else:
                    targets.append(block[:, :rank])
                    zeros += [block[:, rank:]] if rank < layout.rank else []
                sources.append(peft_state_dict[key] if isinstance(source, _Entry) else source)
        if byte_copies:
            import numpy as np

            to_bytes = buffer.view(torch.uint8).numpy()
            from_bytes = np.frombuffer(peft_state_dict.data, dtype=np.uint8)
            for at, begin, length in byte_copies:
                to_bytes[at:at + length] = from_bytes[begin:begin + length]
        with torch.no_grad():  # one call each: the per-tensor overhead stays in C++
            if targets:
                torch._foreach_copy_(targets, sources)
            if zeros:
                torch._foreach_zero_(zeros)
    except BaseException:
        if pool is not None:
            pool.give_back(buffer)
        raise
    packed = PackedAdapter(layout=layout, buffer=buffer, scaling=peft_scaling(peft_config),
                           state_dict=_BlockViews(layout, buffer, where, copies))
    if pool is not None:
        pool.adopt(packed)
    return packed


class SlotLoader:
    """Loads packed adapters into a model's slots: one copy to the device, one batched copy into the slots.

    The model's multi-LoRA layers must stay in place while the loader is used (views of their
    slot tensors are kept). Copies are queued on the current stream; with a pinned buffer the
    host does not wait for them, and the next forward pass on that stream sees the new slot.
    """

    def __init__(self, model: nn.Module):
        self.layers = multi_lora_layers(model)
        self.layout = SlotLayout.of(model)
        first = next(iter(self.layers.values()))
        self.n_slots = first.n_slots
        device = first.lora_A.device
        self._staging = torch.empty(self.layout.numel, dtype=self.layout.dtype, device=device)
        self._staging_views = self.layout.views(self._staging)
        self._scaling = torch.zeros(1, dtype=torch.float32, device=device)
        self._slot_views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def load(self, slot: int, packed: PackedAdapter) -> None:
        """Put ``packed`` into slot ``slot`` (every layer: A, B and scaling)."""
        if packed.layout != self.layout:
            raise AdapterError("the packed adapter was laid out for another model's LoRA slots")
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.n_slots - 1}]")
        matrices, scalings = self._views(slot)
        with torch.no_grad():
            pinned = packed.buffer.is_pinned()
            self._staging.copy_(packed.buffer, non_blocking=pinned)
            if pinned and self._staging.is_cuda:
                read = torch.cuda.Event()
                read.record()
                packed.last_read[0] = read
            torch._foreach_copy_(matrices, self._staging_views)
            self._scaling.fill_(packed.scaling)
            torch._foreach_copy_(scalings, [self._scaling] * len(scalings))

    def _views(self, slot: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if slot not in self._slot_views:
            with torch.no_grad():
                matrices = [m for layer in self.layers.values() for m in (layer.lora_A[slot], layer.lora_B[slot])]
                scalings = [layer.scaling[slot:slot + 1] for layer in self.layers.values()]
            self._slot_views[slot] = (matrices, scalings)
        return self._slot_views[slot]
