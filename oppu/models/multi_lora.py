"""Many users' LoRA adapters over one frozen base, selected per batch row.

Each targeted ``nn.Linear`` is wrapped by a :class:`MultiLoraLinear` that holds every adapter
slot's matrices stacked (``lora_A: [n_slots, rank, in]``, ``lora_B: [n_slots, out, rank]``) and
a per-slot ``scaling``. A forward pass reads which slot each batch row uses from the layer (set
for the whole model with :func:`model_adapters`) and adds that row's own low-rank update::

    y[b] = base(x[b]) + scaling[s_b] * (x[b] @ A[s_b].T) @ B[s_b].T      s_b = slot_ids[b]

with two batched matmuls over gathered matrices, so one pass serves (or trains) rows of many
users; ``s_b = -1`` gives the bare base.

No row ever computes with another slot's matrices scaled by zero: ``0 * NaN`` is NaN, so one
diverged or corrupt adapter would reach every row of the pass (and, in training, every slot's
gradient). A row of the bare base *selects* a zero update (``torch.where``) instead of scaling
slot 0's by 0, and per-token slots (packed training) run each slot's matmuls over its own
tokens only (``oppu.models.span_lora``), so a slot's update and gradient read its own tokens and
matrices and nothing else. An adapter of rank ``r`` below the slot rank fills the
first ``r`` rows of ``A`` / columns of ``B`` and leaves zeros, which add nothing.

Adapters move in and out in PEFT's own format (``adapter_model.safetensors`` keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so what
what ``oppu.models.slot_export`` exports loads with ``PeftModel.from_pretrained`` and what PEFT
saved loads with :func:`load_peft_adapter_into_slot`. Which layers get slots is PEFT's own
``target_modules`` rule (:func:`target_matcher`), so both sides agree on the layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from oppu.errors import AdapterError, ConfigError
from oppu.models.span_lora import SpanPlan, lora_update

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
        # For per-token slot_ids: the (slot, first token, end token) runs of the flattened tokens,
        # grouped for batched matmuls by model_adapters (a SpanPlan), or a list of runs.
        self.slot_spans: SpanPlan | list[tuple[int, int, int]] | None = None

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
        row_scaling = self.scaling[gather].to(x.dtype)
        hidden = torch.bmm(self.dropout(rows), lora_a.transpose(1, 2))
        delta = torch.bmm(hidden, lora_b.transpose(1, 2)) * row_scaling[:, None, None]
        # A base row gathered slot 0 only to keep shapes static: select zero for it rather than
        # scale by 0, which would let a NaN in slot 0 into every base row.
        delta = torch.where(active[:, None, None], delta, 0.0)
        return result + delta.reshape(result.shape)

    def _forward_per_token(self, x: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Every token its own slot (``slot_ids``: ``[batch, seq]``), for packed rows of many users.

        The tokens come in runs of one slot (``slot_spans``, set by :func:`model_adapters`; packed
        training lays each user's samples side by side, so a pass has about one run per user).
        Each run gets its own slot's two matmuls over its own tokens, added in place to the base
        output, runs of similar length batched into one matmul (``oppu.models.span_lora``).
        Selecting tokens rather than masking an all-slots matmul by zeros is what keeps a slot's
        non-finite values (weights, activations or gradients) in that slot: ``0 * NaN`` is NaN.
        """
        if slot_ids.shape != x.shape[:-1]:
            raise ValueError(f"per-token slot_ids has shape {tuple(slot_ids.shape)}, "
                             f"the input has {tuple(x.shape[:-1])} tokens")
        plan = self.slot_spans
        if not isinstance(plan, SpanPlan):
            plan = SpanPlan.build(plan if plan is not None else slot_spans(slot_ids), x.device)
        result = self.base(x)
        return lora_update(result, self.dropout(x), self.lora_A.to(x.dtype), self.lora_B.to(result.dtype),
                           self.scaling, plan)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"n_slots={self.n_slots}, rank={self.rank}")


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoraLinear]:
    """The model's multi-LoRA layers by module name (the base ``nn.Linear``'s name in the model)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MultiLoraLinear)}


def inject_multi_lora(model: nn.Module, targets: LoraConfig | Sequence[str] = ("q_proj", "v_proj"), *,
                      n_slots: int, rank: int, alpha: float, dropout: float = 0.0,
                      dtype: torch.dtype | None = None) -> list[MultiLoraLinear]:
    """Freeze ``model`` and wrap every ``nn.Linear`` that ``targets`` selects (:func:`targeted_linears`)."""
    model.requires_grad_(False)
    layers = []
    for name, linear in targeted_linears(model, targets).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MultiLoraLinear(linear, n_slots, rank, alpha, dropout, dtype)
        setattr(parent, child_name, layer)
        layers.append(layer)
    return layers


def inject_lora_slots(model: nn.Module, peft_config: LoraConfig, *, n_slots: int,
                      dtype: torch.dtype | None = None) -> list[MultiLoraLinear]:
    """:func:`inject_multi_lora` shaped by a LoRA config: on the layers it targets, its rank and
    dropout, every slot at its scaling (:func:`peft_scaling`, rsLoRA included), so a trainer
    hands the config down and reads none of its fields."""
    check_supported(peft_config)
    layers = inject_multi_lora(model, peft_config, n_slots=n_slots, rank=peft_config.r, alpha=peft_config.lora_alpha,
                               dropout=peft_config.lora_dropout, dtype=dtype)
    scaling = peft_scaling(peft_config)
    for layer in layers:
        layer.scaling.fill_(scaling)
    return layers


def target_matcher(targets: LoraConfig | Sequence[str]) -> Callable[[str], bool]:
    """Whether a module name is one ``targets`` adapts, by PEFT's own rule.

    ``targets`` is a ``LoraConfig`` or its ``target_modules`` list. PEFT decides
    (``check_target_module_exists``): a list entry selects the module of that name or any whose
    name ends in ``.entry``; a string is a regular expression the whole name must match;
    ``layers_to_transform`` and ``exclude_modules`` count. So the layers given slots here are
    exactly those a PEFT adapter with the same config has.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = targets if isinstance(targets, LoraConfig) else LoraConfig(target_modules=list(targets))
    return lambda name: bool(check_target_module_exists(config, name))


def targeted_linears(model: nn.Module, targets: LoraConfig | Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` that ``targets`` selects (:func:`target_matcher`), by name."""
    selects = target_matcher(targets)
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and selects(name)}
    if not found:
        wanted = getattr(targets, "target_modules", targets)
        raise ConfigError(f"target_modules={wanted if isinstance(wanted, str) else list(wanted)} "
                          "match no nn.Linear of the model")
    return found


def remove_multi_lora(model: nn.Module) -> None:
    """Put every wrapped base ``nn.Linear`` back in place of its multi-LoRA layer."""
    for name in multi_lora_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, getattr(parent, child_name).base)


def slot_spans(slot_ids: torch.Tensor | Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of equal slots in the flattened ``slot_ids``: ``(slot, start, end)``, slot -1 left out.

    Read on the host: a device tensor is copied back (a sync), so callers on a training or
    serving path hand spans they built on the host to :func:`model_adapters`.
    """
    flat = torch.as_tensor(slot_ids).reshape(-1).tolist()
    spans, start = [], 0
    for i in range(1, len(flat) + 1):
        if i == len(flat) or flat[i] != flat[start]:
            if flat[start] >= 0:
                spans.append((flat[start], start, i))
            start = i
    return spans


@contextlib.contextmanager
def model_adapters(model: nn.Module, slot_ids: torch.Tensor | Sequence[int],
                   spans: Sequence[tuple[int, int, int]] | None = None) -> Iterator[None]:
    """Within the block, batch row ``b`` of every forward uses adapter slot ``slot_ids[b]`` (-1: none).

    ``slot_ids`` of shape ``[batch, seq]`` choose a slot per token instead (rows that pack
    samples of several users; see ``MultiLoraLinear._forward_per_token``), run by run: ``spans``
    are those runs (:func:`slot_spans` of ``slot_ids``, built on the host), worked out here from
    ``slot_ids`` when not given (a device sync for a tensor on the GPU). Host ``slot_ids`` are
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
    # Per-token slots: the runs of one slot are worked out once for all layers, on the host.
    if slot_tensor.dim() == 2 and spans is None:
        spans = slot_spans(slot_tensor)
    # Values are checked where they live on the host; reading a device tensor would wait for the GPU.
    if slot_tensor.device.type == "cpu":
        if slot_tensor.numel() and (int(slot_tensor.max()) >= n_slots or int(slot_tensor.min()) < NO_ADAPTER):
            raise ValueError(f"slot_ids must lie in [-1, {n_slots - 1}], got {slot_tensor.tolist()}")
        if device.type == "cuda":
            slot_tensor = slot_tensor.pin_memory().to(device, non_blocking=True)
    slot_tensor = slot_tensor.to(device)
    spans = list(spans) if slot_tensor.dim() == 2 else None
    if spans is not None and any(not 0 <= slot < n_slots for slot, _, _ in spans):
        raise ValueError(f"slot spans must name slots in [0, {n_slots - 1}], got {spans}")
    if spans is not None:  # grouped once for every layer of the pass
        spans = SpanPlan.build(spans, device, n_slots)
    previous = [(layer.slot_ids, layer.slot_spans) for layer in layers]
    for layer in layers:
        layer.slot_ids, layer.slot_spans = slot_tensor, spans
    try:
        yield
    finally:
        for layer, (slot, runs) in zip(layers, previous, strict=True):
            layer.slot_ids, layer.slot_spans = slot, runs


def peft_scaling(peft_config: LoraConfig) -> float:
    """LoRA's scaling for a config: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if peft_config.use_rslora:
        return peft_config.lora_alpha / math.sqrt(peft_config.r)
    return peft_config.lora_alpha / peft_config.r


def check_supported(peft_config: LoraConfig) -> None:
    """``AdapterError`` unless ``peft_config`` is plain LoRA, the one kind a slot holds."""
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
    This copies layer by layer; serving packs an adapter once and loads it in one copy
    (``oppu.serving.slot_packing``).
    """
    check_supported(peft_config)
    layers = multi_lora_layers(model)
    check_slot(layers, slot)
    matrices = adapter_matrices(peft_state_dict, layers)
    scaling = peft_scaling(peft_config)
    with torch.no_grad():
        for name, layer in layers.items():
            pair = matrices.get(name)
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.scaling[slot] = scaling
            if pair is None:
                continue
            lora_a, lora_b = checked_pair(name, pair, layer.rank, layer.in_features, layer.out_features)
            rank = lora_a.shape[0]
            layer.lora_A[slot, :rank].copy_(lora_a)
            layer.lora_B[slot, :, :rank].copy_(lora_b)


def adapter_matrices(peft_state_dict: dict[str, torch.Tensor],
                      layer_names) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict's tensors by module name and matrix; a key naming no layer raises ``AdapterError``."""
    matrices: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state_dict.items():
        module_name, matrix = parse_peft_key(key)
        if module_name not in layer_names:
            raise AdapterError(f"adapter key {key!r} names no multi-LoRA layer of the model "
                               f"(layers: {sorted(layer_names)[:3]}...)")
        matrices.setdefault(module_name, {})[matrix] = tensor
    return matrices


def checked_pair(name: str, pair: dict, slot_rank: int, in_features: int,
                  out_features: int) -> tuple:
    """A layer's ``(lora_A, lora_B)``, or ``AdapterError`` naming what does not fit the layer.

    The pair's values are tensors or anything with a ``shape`` (``slot_packing.SafetensorsFile`` entries).
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


def parse_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (``<module>``, ``lora_A``)."""
    body = key.removeprefix(PEFT_PREFIX)
    module_name, _, rest = body.rpartition(".lora_")
    if not module_name or rest not in ("A.weight", "B.weight"):
        raise AdapterError(f"adapter key {key!r} is not a PEFT LoRA weight (…<module>.lora_A/B.weight)")
    return module_name, "lora_" + rest.removesuffix(".weight")


def check_slot(layers: dict[str, MultiLoraLinear], slot: int) -> None:
    if not layers:
        raise ValueError("the model has no multi-LoRA layers: call inject_multi_lora first")
    n_slots = next(iter(layers.values())).n_slots
    if not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} is outside [0, {n_slots - 1}]")


def clear_slot(model: nn.Module, slot: int) -> None:
    """Zero adapter slot ``slot`` in every layer: rows using it then see the bare base."""
    layers = multi_lora_layers(model)
    check_slot(layers, slot)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
