"""DeepSpeed ZeRO configurations for base-model adaptation (``jobs/train_base.py`` via Ray Train).

``deepspeed_config`` builds the dict ``deepspeed.initialize(config=...)`` takes; the shipped
``configs/deepspeed/zero2.json`` and ``zero3.json`` are its output with the run-dependent keys
(micro-batch size, gradient clipping, schedule length) left out for the job to fill from its
``OptimSettings``. The optimiser is DeepSpeed's AdamW with ``torch_adam: true``: PyTorch's own
fused implementation, so no CUDA extension is compiled on the worker.

    python -m oppu.training.deepspeed configs/deepspeed    # rewrites the shipped JSON files (logs each path)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal

from oppu.errors import ConfigError

# Communication buckets large enough to keep NCCL busy, small enough for a 7B model on 80 GB.
BUCKET_ELEMENTS = 200_000_000


def deepspeed_config(stage: Literal[2, 3], *, bf16: bool = True, grad_accum: int = 1,
                     micro_batch: int | None = None, lr: float = 1e-4, weight_decay: float = 0.01,
                     max_grad_norm: float | None = None, warmup_steps: int | None = None,
                     total_steps: int | None = None, offload_optimizer: bool = False) -> dict:
    """A ZeRO stage-2 or stage-3 config with AdamW (``torch_adam``) and, given ``total_steps``,
    linear warmup then linear decay (DeepSpeed's ``WarmupDecayLR``).

    ``micro_batch`` and ``max_grad_norm`` are omitted when ``None`` (the caller sets
    ``train_micro_batch_size_per_gpu`` / ``gradient_clipping``). Stage 3 also gathers the 16-bit
    weights on save, so a checkpoint is a plain ``save_pretrained`` directory.
    """
    if stage not in (2, 3):
        raise ConfigError(f"deepspeed stage must be 2 or 3, got {stage!r}")
    if grad_accum < 1:
        raise ConfigError(f"deepspeed grad_accum must be >= 1, got {grad_accum}")
    if micro_batch is not None and micro_batch < 1:
        raise ConfigError(f"deepspeed micro_batch must be >= 1, got {micro_batch}")
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": BUCKET_ELEMENTS}
    if stage == 2:
        zero |= {"allgather_partitions": True, "allgather_bucket_size": BUCKET_ELEMENTS, "reduce_scatter": True}
    else:
        zero |= {"stage3_prefetch_bucket_size": BUCKET_ELEMENTS // 4,
                 "stage3_param_persistence_threshold": 100_000,
                 "stage3_gather_16bit_weights_on_model_save": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict = {
        "gradient_accumulation_steps": grad_accum,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True}},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch
    if max_grad_norm is not None:
        config["gradient_clipping"] = max_grad_norm
    if total_steps is not None:
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps or 0,
            "total_num_steps": total_steps, "warmup_type": "linear"}}
    return config


def write_shipped_configs(out_dir: str | Path) -> list[Path]:
    """Write ``zero2.json`` and ``zero3.json`` (bf16, the OPPU optimiser defaults)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stage in (2, 3):
        path = out / f"zero{stage}.json"
        path.write_text(json.dumps(deepspeed_config(stage), indent=2) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str]) -> None:
    """``python -m oppu.training.deepspeed [DIR]``: the shipped configs rewritten, each path logged."""
    from oppu import logs

    logs.configure()
    logger = logging.getLogger("oppu.training.deepspeed")  # as a script, __name__ is __main__
    for written in write_shipped_configs(argv[0] if argv else "configs/deepspeed"):
        logger.info("wrote %s", written)


if __name__ == "__main__":
    main(sys.argv[1:])
