"""A multi-LoRA slot out as a PEFT adapter: the one export, used by batched training and by tests.

:func:`snapshot_slot` starts copying a slot's matrices to the host behind the GPU's work (one
device copy, one non-blocking copy into pinned memory), so the slot can take its next user at
once; :meth:`SlotSnapshot.state_dict` hands the adapter over in PEFT's saved format (keys
``base_model.model.<module>.lora_A.weight``, each layer cut to ``peft_config.r``).
:func:`export_slot_as_peft` is the same, waited for; :func:`save_slot_as_peft` writes it as a
directory ``PeftModel.from_pretrained`` loads (``oppu.models.peft_adapters.write_peft_adapter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oppu.errors import AdapterError
from oppu.models.multi_lora import PEFT_PREFIX, check_slot, check_supported, multi_lora_layers, target_matcher

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from torch import nn

    StateDict = dict[str, torch.Tensor]


@dataclass
class SlotSnapshot:
    """A slot's adapter (and its user's per-step losses, or any per-step tensor) on their way to the host.

    The copies are queued behind the GPU's work without waiting for it: a device copy of the
    slot first (so the slot can take its next user at once), then one non-blocking copy into
    pinned host memory. ``ready`` says whether it has landed; ``state_dict`` waits if not.
    """

    names: list[tuple[str, tuple[int, ...]]]
    adapter: torch.Tensor
    losses: torch.Tensor | None
    event: object | None  # torch.cuda.Event once the copies are queued on a GPU

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def state_dict(self) -> StateDict:
        """The adapter in PEFT's saved format: each tensor its own contiguous CPU copy."""
        self.wait()
        state, offset = {}, 0
        for key, shape in self.names:
            size = math.prod(shape)
            state[key] = self.adapter[offset:offset + size].view(shape).clone()
            offset += size
        return state


def snapshot_slot(model: nn.Module, slot: int, peft_config: LoraConfig, losses: torch.Tensor | None = None,
                  targets: set[str] | None = None, dtype: torch.dtype | None = None) -> SlotSnapshot:
    """Start copying slot ``slot`` (the layers ``peft_config`` targets, cut to its rank) to the host.

    ``targets``: those layers' names, if the caller has them (matching them walks every layer).
    ``dtype``: the exported tensors' dtype (default: the slots').
    """
    import torch

    check_supported(peft_config)
    layers = multi_lora_layers(model)
    check_slot(layers, slot)
    if targets is None:
        selects = target_matcher(peft_config)
        targets = {name for name in layers if selects(name)}
    rank = peft_config.r
    names, parts = [], []
    for name, layer in layers.items():
        if name not in targets:
            continue
        if rank > layer.rank:
            raise AdapterError(f"peft_config.r={rank} exceeds the slots' rank {layer.rank} (layer {name!r})")
        for matrix, tensor in (("lora_A", layer.lora_A[slot, :rank]), ("lora_B", layer.lora_B[slot, :, :rank])):
            names.append((f"{PEFT_PREFIX}{name}.{matrix}.weight", tuple(tensor.shape)))
            parts.append(tensor.detach().reshape(-1))
    if not parts:
        raise AdapterError(f"peft_config.target_modules={peft_config.target_modules} selects no multi-LoRA layer")
    flat = torch.cat(parts)
    if dtype is not None:
        flat = flat.to(dtype)
    if not flat.is_cuda:
        return SlotSnapshot(names, flat, None if losses is None else losses.detach().clone(), None)
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    host_losses = None
    if losses is not None:
        host_losses = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
        host_losses.copy_(losses, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return SlotSnapshot(names, host, host_losses, event)


def export_slot_as_peft(model: nn.Module, slot: int, peft_config: LoraConfig,
                        dtype: torch.dtype | None = None) -> StateDict:
    """Slot ``slot`` as the state dict PEFT saves for ``peft_config`` (same keys and shapes; CPU tensors).

    Only the layers ``peft_config`` targets are exported, each cut to rank ``peft_config.r``;
    one device-to-host copy for the whole adapter.
    """
    return snapshot_slot(model, slot, peft_config, dtype=dtype).state_dict()


def save_slot_as_peft(model: nn.Module, slot: int, peft_config: LoraConfig, out_dir: str | Path,
                      dtype: torch.dtype | None = None) -> Path:
    """Write slot ``slot`` as a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``)."""
    from oppu.models.peft_adapters import write_peft_adapter

    return write_peft_adapter(out_dir, export_slot_as_peft(model, slot, peft_config, dtype), peft_config)
