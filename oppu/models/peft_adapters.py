"""Plugging PEFT adapters in and out of a shared frozen base model, and writing them as PEFT does."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig


def nonfinite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors of ``state_dict`` holding a NaN or an infinity, in key order.

    The store refuses to publish such an adapter and serving to load one: a diverged adapter
    would give garbage answers, and a NaN in a shared multi-LoRA kernel must never get the chance
    to reach other users' rows.
    """
    import torch

    return [name for name in state_dict if not bool(torch.isfinite(state_dict[name]).all())]


def remove_adapter(peft_model) -> None:
    """Take the adapter's layers out of the shared base (prompt tuning never put any in)."""
    from peft.tuners.tuners_utils import BaseTuner

    tuner = peft_model.base_model
    if isinstance(tuner, BaseTuner):
        tuner.unload()


def write_peft_adapter(out_dir: str | Path, state_dict: dict[str, torch.Tensor], peft_config: PeftConfig,
                       base_model_name_or_path: str | None = None) -> Path:
    """Write an adapter's PEFT state dict and config as the directory ``PeftModel.from_pretrained`` loads.

    ``adapter_model.safetensors`` (with PEFT's ``{"format": "pt"}`` metadata) and
    ``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it: ``inference_mode`` true,
    and ``base_model_name_or_path`` naming the base where given. ``peft_config`` itself is left
    as it is (a trainable config can be handed in). Returns the directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    saved = copy.copy(peft_config)
    saved.inference_mode = True
    if base_model_name_or_path is not None:
        saved.base_model_name_or_path = base_model_name_or_path
    saved.save_pretrained(str(out))
    return out
