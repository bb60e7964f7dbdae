"""A 4-bit frozen base for QLoRA: personal adapters trained on GPUs too small for the bf16 base
(``users.quantize: nf4`` in the run config; ``load_model(..., quantize="nf4")``).

The base's linear layers are stored in bitsandbytes' NF4 (4 bits a weight, about a quarter of
bf16) and dequantised on the fly to bf16 for each matmul; LoRA adapters stay in full precision
on top (``oppu.models.multi_lora`` wraps the 4-bit linears like any ``nn.Linear``). The price is
the dequantisation in every forward and backward pass: measured in ``docs/performance-training.md``.
"""

from __future__ import annotations

import os

from oppu.errors import ConfigError


def bnb_4bit_config(compute_dtype: str = "bfloat16", double_quant: bool = False):
    """QLoRA's quantisation: NF4 weights, matmuls in ``compute_dtype``."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              bnb_4bit_use_double_quant=double_quant)


def load_base_4bit(uri: str | os.PathLike, *, compute_dtype: str = "bfloat16", double_quant: bool = False,
                   device_index: int | None = None):
    """Load the causal LM at ``uri`` (HF id, local dir or fsspec URI) with 4-bit NF4 linear weights.

    Needs a CUDA GPU and the ``bitsandbytes`` package (the ``gpu`` extra); raises ``ConfigError``
    saying which is missing. The model comes back frozen, in eval mode, on ``cuda:device_index``
    (default: the current device).
    """
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"4-bit loading of {str(uri)!r} needs a CUDA GPU and none is visible: "
                          "load the base in bf16/fp32 instead")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"4-bit loading of {str(uri)!r} needs bitsandbytes: pip install 'oppu[gpu]' "
                          f"({error})") from error
    from transformers import AutoModelForCausalLM

    from oppu.models.loading import resolve_model_dir

    index = torch.cuda.current_device() if device_index is None else device_index
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_dir(uri)), quantization_config=bnb_4bit_config(compute_dtype, double_quant),
        dtype=getattr(torch, compute_dtype), device_map={"": index})
    model.requires_grad_(False)
    return model.eval()
