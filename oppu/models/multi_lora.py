"""Many users' LoRA adapters over one frozen base, selected per batch row.

Each targeted ``nn.Linear`` is wrapped by a :class:`MultiLoraLinear` that holds every adapter
slot's matrices stacked (``lora_A: [n_slots, rank, in]``, ``lora_B: [n_slots, out, rank]``) and
a per-slot ``scaling``. A forward pass reads which slot each batch row uses from the layer (set
for the whole model with :func:`model_adapters`) and adds that row's own low-rank update::

    y[b] = base(x[b]) + scaling[s_b] * (x[b] @ A[s_b].T) @ B[s_b].T      s_b = slot_ids[b]

with two batched matmuls over gathered matrices, so one pass serves (or trains) rows of many
users; ``s_b = -1`` gives the bare base. An adapter of rank ``r`` below the slot rank fills the
first ``r`` rows of ``A`` / columns of ``B`` and leaves zeros, which add nothing.

Adapters move in and out in PEFT's own format (``adapter_model.safetensors`` keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so what
:func:`export_slot_as_peft` writes loads with ``PeftModel.from_pretrained`` and what PEFT saved
loads with :func:`load_peft_adapter_into_slot`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from oppu.errors import AdapterError

if TYPE_CHECKING:
    from peft import LoraConfig

PEFT_PREFIX = "base_model.model."
NO_ADAPTER = -1


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``n_slots`` LoRA adapters, one chosen per batch row.

    ``dtype`` is the dtype the stacked matrices are stored in (default: the base weight's);
    training keeps them in float32 while the base runs in bf16, and the forward casts them to
    the activations' dtype.
    """

    def __init__(self, base: nn.Linear, n_slots: int, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if n_slots < 1 or rank < 1:
            raise ValueError(f"n_slots and rank must be >= 1, got n_slots={n_slots}, rank={rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.n_slots, self.rank = n_slots, rank
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(n_slots, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(n_slots, self.out_features, rank, **factory))
        self.register_buffer("scaling", torch.full((n_slots,), alpha / rank, device=base.weight.device,
                                                   dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slot_ids: torch.Tensor | None = None  # LongTensor[batch] or [batch, seq], set by model_adapters
        self.slot_onehot: torch.Tensor | None = None  # BoolTensor[tokens, n_slots] for per-token slot_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot_ids = self.slot_ids
        if slot_ids is not None and slot_ids.dim() == 2:
            return self._forward_per_token(x, slot_ids)
        result = self.base(x)
        if slot_ids is None:
            return result
        batch = x.shape[0]
        if slot_ids.shape != (batch,):
            raise ValueError(f"slot_ids has shape {tuple(slot_ids.shape)}, the batch has {batch} rows")
        rows = x.reshape(batch, -1, self.in_features)
        active = slot_ids >= 0
        gather = slot_ids.clamp(min=0)
        lora_a = self.lora_A[gather].to(x.dtype)  # [batch, rank, in]
        lora_b = self.lora_B[gather].to(x.dtype)  # [batch, out, rank]
        row_scaling = torch.where(active, self.scaling[gather], 0.0).to(x.dtype)
        hidden = torch.bmm(self.dropout(rows), lora_a.transpose(1, 2))
        delta = torch.bmm(hidden, lora_b.transpose(1, 2)) * row_scaling[:, None, None]
        return result + delta.reshape(result.shape)

    def _forward_per_token(self, x: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Every token its own slot (``slot_ids``: ``[batch, seq]``), for packed rows of many users.

        All slots' ``A`` stacked form one ``[n_slots * rank, in]`` matrix: one matmul gives every
        slot's down-projection of every token, a mask keeps each token's own slot's ``rank``
        columns (times its scaling; -1 keeps none) and one ``addmm`` with all slots' ``B`` adds
        the update to the base output. A token's update, and the gradient a slot receives, are
        those of its own slot alone: the other slots' columns are multiplied by exact zeros. Two
        plain GEMMs whose width is ``n_slots * rank`` (64 for 8 slots of rank 8), no gathered
        copies of ``A`` / ``B``, no per-row batched matmuls.
        """
        if slot_ids.shape != x.shape[:-1]:
            raise ValueError(f"per-token slot_ids has shape {tuple(slot_ids.shape)}, "
                             f"the input has {tuple(x.shape[:-1])} tokens")
        result = self.base(x)
        tokens = slot_ids.numel()
        width = self.n_slots * self.rank
        owned = self.slot_onehot
        if owned is None or owned.shape != (tokens, self.n_slots):
            owned = slot_onehot(slot_ids, self.n_slots)
        weights = torch.where(owned, self.scaling, 0.0).to(x.dtype)  # [tokens, n_slots]
        lora_a = self.lora_A.to(x.dtype).reshape(width, self.in_features)
        # One cast-and-transpose copy: [n_slots, out, rank] -> [out, n_slots * rank].
        lora_b = self.lora_B.transpose(0, 1).to(result.dtype, memory_format=torch.contiguous_format)
        lora_b = lora_b.reshape(self.out_features, width)  # a view, unless .to() had nothing to cast
        hidden = torch.nn.functional.linear(self.dropout(x.reshape(tokens, self.in_features)), lora_a)
        hidden = (hidden.view(tokens, self.n_slots, self.rank) * weights[:, :, None]).view(tokens, width)
        out = torch.addmm(result.reshape(tokens, self.out_features), hidden.to(result.dtype), lora_b.t())
        return out.view(result.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"n_slots={self.n_slots}, rank={self.rank}")


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoraLinear]:
    """The model's multi-LoRA layers by module name (the base ``nn.Linear``'s name in the model)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MultiLoraLinear)}


def inject_multi_lora(model: nn.Module, target_modules: Sequence[str] = ("q_proj", "v_proj"), *,
                      n_slots: int, rank: int, alpha: float, dropout: float = 0.0,
                      dtype: torch.dtype | None = None) -> list[MultiLoraLinear]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends in one of ``target_modules``.

    Matching follows PEFT's rule for a list of names (the module name equals the entry or ends in
    ``.entry``), so a PEFT adapter trained with the same ``target_modules`` fits every layer.
    """
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and _matches(name, target_modules)]
    if not targets:
        raise ValueError(f"no nn.Linear in the model matches target_modules={list(target_modules)}")
    layers = []
    for name, linear in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MultiLoraLinear(linear, n_slots, rank, alpha, dropout, dtype)
        setattr(parent, child_name, layer)
        layers.append(layer)
    return layers


def remove_multi_lora(model: nn.Module) -> None:
    """Put every wrapped base ``nn.Linear`` back in place of its multi-LoRA layer."""
    for name in multi_lora_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, getattr(parent, child_name).base)


def _matches(name: str, target_modules: Sequence[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in target_modules)


def slot_onehot(slot_ids: torch.Tensor, n_slots: int) -> torch.Tensor:
    """``[tokens, n_slots]`` booleans: which slot each token (of ``slot_ids``, any shape) uses."""
    return slot_ids.reshape(-1, 1) == torch.arange(n_slots, device=slot_ids.device)


@contextlib.contextmanager
def model_adapters(model: nn.Module, slot_ids: torch.Tensor | Sequence[int]) -> Iterator[None]:
    """Within the block, batch row ``b`` of every forward uses adapter slot ``slot_ids[b]`` (-1: none).

    ``slot_ids`` of shape ``[batch, seq]`` choose a slot per token instead (rows that pack
    samples of several users; see ``MultiLoraLinear._forward_per_token``). Host ``slot_ids`` are
    range-checked; a tensor already on the device is taken as it is.
    """
    layers = list(multi_lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no multi-LoRA layers: call inject_multi_lora first")
    device = layers[0].lora_A.device
    slot_tensor = torch.as_tensor(slot_ids, dtype=torch.long)
    if slot_tensor.dim() not in (1, 2):
        raise ValueError(f"slot_ids must be one index per batch row (or per token), "
                         f"got shape {tuple(slot_tensor.shape)}")
    n_slots = layers[0].n_slots
    # Values are checked where they live on the host; reading a device tensor would wait for the GPU.
    if slot_tensor.device.type == "cpu":
        if slot_tensor.numel() and (int(slot_tensor.max()) >= n_slots or int(slot_tensor.min()) < NO_ADAPTER):
            raise ValueError(f"slot_ids must lie in [-1, {n_slots - 1}], got {slot_tensor.tolist()}")
        if device.type == "cuda":
            slot_tensor = slot_tensor.pin_memory().to(device, non_blocking=True)
    slot_tensor = slot_tensor.to(device)
    # Per-token slots: which slot each token uses is worked out once for all layers.
    onehot = slot_onehot(slot_tensor, n_slots) if slot_tensor.dim() == 2 else None
    previous = [(layer.slot_ids, layer.slot_onehot) for layer in layers]
    for layer in layers:
        layer.slot_ids, layer.slot_onehot = slot_tensor, onehot
    try:
        yield
    finally:
        for layer, (slot, owned) in zip(layers, previous, strict=True):
            layer.slot_ids, layer.slot_onehot = slot, owned


def peft_scaling(peft_config: LoraConfig) -> float:
    """LoRA's scaling for a config: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if peft_config.use_rslora:
        return peft_config.lora_alpha / math.sqrt(peft_config.r)
    return peft_config.lora_alpha / peft_config.r


def _check_supported(peft_config: LoraConfig) -> None:
    unsupported = {"rank_pattern": bool(peft_config.rank_pattern),
                   "alpha_pattern": bool(peft_config.alpha_pattern),
                   "use_dora": bool(peft_config.use_dora),
                   "lora_bias": bool(getattr(peft_config, "lora_bias", False)),
                   "bias": peft_config.bias != "none"}
    bad = [name for name, used in unsupported.items() if used]
    if bad:
        raise AdapterError(f"multi-LoRA slots hold plain LoRA only; the adapter config uses {', '.join(bad)}")


def load_peft_adapter_into_slot(model: nn.Module, slot: int, peft_state_dict: dict[str, torch.Tensor],
                                peft_config: LoraConfig) -> None:
    """Copy a PEFT LoRA adapter (its saved state dict and config) into adapter slot ``slot``.

    Every multi-LoRA layer the adapter does not cover gets a zero update in this slot; a key that
    names no multi-LoRA layer, or a rank above the slots' rank, raises ``AdapterError``.
    This copies layer by layer; :class:`SlotLoader` loads a :func:`pack_peft_adapter` buffer in
    one copy, which is what serving uses.
    """
    _check_supported(peft_config)
    layers = multi_lora_layers(model)
    _check_slot(layers, slot)
    matrices = _adapter_matrices(peft_state_dict, layers)
    scaling = peft_scaling(peft_config)
    with torch.no_grad():
        for name, layer in layers.items():
            pair = matrices.get(name)
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.scaling[slot] = scaling
            if pair is None:
                continue
            lora_a, lora_b = _checked_pair(name, pair, layer.rank, layer.in_features, layer.out_features)
            rank = lora_a.shape[0]
            layer.lora_A[slot, :rank].copy_(lora_a)
            layer.lora_B[slot, :, :rank].copy_(lora_b)


def _adapter_matrices(peft_state_dict: dict[str, torch.Tensor],
                      layer_names) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict's tensors by module name and matrix; a key naming no layer raises ``AdapterError``."""
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state_dict.items():
        module_name, matrix = _parse_peft_key(key)
        if module_name not in layer_names:
            raise AdapterError(f"adapter key {key!r} names no multi-LoRA layer of the model "
                               f"(layers: {sorted(layer_names)[:3]}...)")
        matrices.setdefault(module_name, {})[matrix] = tensor
    return matrices


def _checked_pair(name: str, pair: dict, slot_rank: int, in_features: int,
                  out_features: int) -> tuple:
    """A layer's ``(lora_A, lora_B)``, or ``AdapterError`` naming what does not fit the layer.

    The pair's values are tensors or anything with a ``shape`` (a :class:`SafetensorsFile` entry).
    """
    if set(pair) != {"lora_A", "lora_B"}:
        raise AdapterError(f"adapter for layer {name!r} has {sorted(pair)}, needs lora_A and lora_B")
    lora_a, lora_b = pair["lora_A"], pair["lora_B"]
    shape_a, shape_b = tuple(lora_a.shape), tuple(lora_b.shape)
    rank = shape_a[0] if len(shape_a) == 2 else -1
    if not 1 <= rank <= slot_rank or shape_a != (rank, in_features) or shape_b != (out_features, rank):
        raise AdapterError(
            f"adapter for layer {name!r} has lora_A {shape_a} and lora_B {shape_b}; the layer takes "
            f"rank <= {slot_rank}, in={in_features}, out={out_features}")
    return lora_a, lora_b


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
                        module=r"oppu\.models\.multi_lora")


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
    _check_supported(peft_config)
    index = layout.index
    raw = peft_state_dict.entries if isinstance(peft_state_dict, SafetensorsFile) else peft_state_dict
    matrices = _adapter_matrices(raw, index)
    keys = {_parse_peft_key(key): key for key in raw}
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
            lora_a, lora_b = _checked_pair(name, pair, layout.rank, in_features, out_features)
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


def _parse_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``lora_A``)."""
    body = key.removeprefix(PEFT_PREFIX)
    module_name, _, rest = body.rpartition(".lora_")
    if not module_name or rest not in ("A.weight", "B.weight"):
        raise AdapterError(f"adapter key {key!r} is not a PEFT LoRA weight (…<module>.lora_A/B.weight)")
    return module_name, "lora_" + rest.removesuffix(".weight")


def _check_slot(layers: dict[str, MultiLoraLinear], slot: int) -> None:
    if not layers:
        raise ValueError("the model has no multi-LoRA layers: call inject_multi_lora first")
    n_slots = next(iter(layers.values())).n_slots
    if not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} is outside [0, {n_slots - 1}]")


def clear_slot(model: nn.Module, slot: int) -> None:
    """Zero adapter slot ``slot`` in every layer: rows using it then see the bare base."""
    layers = multi_lora_layers(model)
    _check_slot(layers, slot)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()


def export_slot_as_peft(model: nn.Module, slot: int, peft_config: LoraConfig,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Slot ``slot`` as the state dict PEFT saves for ``peft_config`` (same keys, shapes; CPU tensors).

    Only layers ``peft_config.target_modules`` selects are exported, each cut to rank
    ``peft_config.r``.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    _check_supported(peft_config)
    layers = multi_lora_layers(model)
    _check_slot(layers, slot)
    rank = peft_config.r
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if not check_target_module_exists(peft_config, name):
            continue
        if rank > layer.rank:
            raise AdapterError(f"peft_config.r={rank} exceeds the slots' rank {layer.rank} (layer {name!r})")
        for matrix, tensor in (("lora_A", layer.lora_A[slot, :rank]), ("lora_B", layer.lora_B[slot, :, :rank])):
            exported = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()
            state[f"{PEFT_PREFIX}{name}.{matrix}.weight"] = exported
    if not state:
        raise AdapterError(f"peft_config.target_modules={peft_config.target_modules} selects no multi-LoRA layer")
    return state


def save_slot_as_peft(model: nn.Module, slot: int, peft_config: LoraConfig, out_dir: str | Path,
                      dtype: torch.dtype | None = None) -> Path:
    """Write slot ``slot`` as a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(export_slot_as_peft(model, slot, peft_config, dtype), str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_config.save_pretrained(str(out))
    return out
