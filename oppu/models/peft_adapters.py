"""Plugging PEFT adapters in and out of a shared frozen base model, and writing them as PEFT does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig


def remove_adapter(peft_model) -> None:
    """Take the adapter's layers out of the shared base (prompt tuning never put any in)."""
    from peft.tuners.tuners_utils import BaseTuner

    tuner = peft_model.base_model
    if isinstance(tuner, BaseTuner):
        tuner.unload()


def write_peft_adapter(out_dir: str | Path, state_dict: dict[str, torch.Tensor], peft_config: PeftConfig) -> Path:
    """Write an adapter's PEFT state dict and config as the directory ``PeftModel.from_pretrained`` loads.

    ``adapter_model.safetensors`` (with PEFT's ``{"format": "pt"}`` metadata) and
    ``adapter_config.json`` (``peft_config.save_pretrained``); returns the directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config.save_pretrained(str(out))
    return out
