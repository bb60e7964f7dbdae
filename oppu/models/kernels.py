"""Fused kernels for a frozen base in training (``users.kernels``): liger-kernel's Triton kernels.

A small base trains host-bound and elementwise-bound: on an H100, SmolLM2-135M's batched users
step spent more GPU time in eager RMSNorm, SiLU-times-up and RoPE kernels (0.54 s of 1.31 s) than
in its GEMMs (0.41 s), and every one of those small kernels is a launch the host pays for
(``bench/train_users.py --shape smollm2-135m``, profile, 2026-12-06). liger-kernel replaces each
with one fused Triton kernel, forward and backward. It patches the model's modules in place (and
its model family's RoPE function for the whole process), so it is applied once per base load,
in the process that trains, and is never undone. Measured since (H100, 2026-12-07,
``bench/results/train_users_smollm2-kernels.json``, one run each): at 16,384-token passes of 25 users
the batched trainer ran no faster with it (37,666 against 37,769 tokens/s), the host's launches
being the limit there; so the packaged configs leave it off.

The LM head's cross-entropy is left alone: both trainers run the head on trained positions only
and compute the loss themselves. The multi-LoRA and PEFT wrappers of ``q/k/v/o/gate/up/down``
are untouched: liger's SwiGLU module calls the projections it finds, wrapped or not.
"""

from __future__ import annotations

import logging

from oppu.errors import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'oppu[liger]' (liger-kernel, which needs a CUDA GPU and Triton)"


def use_kernels(model, kernels: str, *, key: str = "users.kernels") -> None:
    """Swap ``model``'s RMSNorm, SwiGLU MLP and RoPE for fused kernels when ``kernels`` is ``liger``.

    ``torch`` leaves the model as it is. ``liger`` needs the model on a CUDA device, liger-kernel
    installed, and a model family liger supports (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...); any
    of these missing is a ``ConfigError`` naming ``key``, raised before anything is patched.
    """
    if kernels == "torch":
        return
    if kernels != "liger":
        raise ConfigError(f"{key} must be 'torch' or 'liger', got {kernels!r}")
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        where = "no parameters" if parameter is None else f"parameters on {parameter.device}"
        raise ConfigError(f"{key}=liger runs Triton kernels on a CUDA GPU, and this base has {where}: "
                          f"give the stage GPUs, or set {key}=torch")
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError as exc:
        raise ConfigError(f"{key}=liger needs liger-kernel, which cannot be imported here ({exc}): "
                          f"{INSTALL_HINT}, or set {key}=torch") from exc
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"{key}=liger: liger-kernel has no kernels for model type {model_type!r} "
                          f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set {key}=torch")
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    logger.info("liger-kernel's RMSNorm, SwiGLU and RoPE applied to the %s base", model_type)
