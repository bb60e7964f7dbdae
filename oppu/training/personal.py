"""Train one user's personal PEFT module on that user's history alone.

The frozen base is shared: ``train_user_adapter`` plugs a fresh adapter into it, trains, saves
the adapter in PEFT's format and takes it out again, leaving the base as it found it. Every
random choice (adapter init, dropout, sample order) is seeded from (seed, user id) alone, so a
user's adapter is bit-identical whatever other users the same process trained before it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oppu.models.peft_adapters import remove_adapter
from oppu.run_config import OptimSettings
from oppu.tasks.base import TrainingSample

if TYPE_CHECKING:
    from peft import PeftConfig


@dataclass
class TrainStats:
    """What training one user's adapter took, as both trainers (this one and ``batched``) count it.

    ``metrics()`` is what the store records of it (``oppu.training.publish``).
    """

    samples: int
    epochs: int
    steps: int
    target_tokens: int = 0  # trained-on tokens, summed over epochs
    input_tokens: int = 0  # all real (non-padding) tokens processed, summed over epochs
    final_loss: float = float("nan")  # mean loss of the user's last step
    seconds: float = 0.0  # wall time of the training (batched: from the pass's start to this user's end)
    losses: list[float] = field(default_factory=list)  # mean loss of every step

    def metrics(self) -> dict[str, float]:
        """The manifest's ``metrics``: the same keys whichever trainer trained the adapter."""
        return {"final_loss": self.final_loss, "samples": self.samples, "steps": self.steps,
                "tokens": self.target_tokens, "seconds": self.seconds}


def user_seed(seed: int, user_id: str) -> int:
    """A per-user seed that depends on nothing but the run seed and the user id."""
    digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def train_user_adapter(base_model, tokenizer, samples: list[TrainingSample], peft_config: PeftConfig,
                       optim: OptimSettings, epochs: int, seed: int, user_id: str,
                       out_dir: str | Path, prompt_format: str = "plain", *,
                       init_adapter: str | Path | None = None) -> TrainStats:
    """Train a personal adapter for ``user_id`` on ``samples`` and save it (PEFT layout) to ``out_dir``.

    ``peft_config`` is a trainable PEFT config (``PeftSettings.to_peft_config()``), left as given.
    With ``init_adapter`` (a PEFT adapter directory of the same shape, e.g. the user's current
    version) training continues from its weights, loaded by PEFT (``PeftModel.from_pretrained(...,
    is_trainable=True)``), instead of a fresh adapter; a fresh optimiser and schedule either way.
    """
    import peft
    import torch

    from oppu.models.samples import encode_samples

    if not samples:
        raise ValueError(f"user {user_id!r} has no training samples")
    encoded = encode_samples(tokenizer, samples, optim.max_length, prompt_format)
    torch.manual_seed(user_seed(seed, user_id))
    shuffler = torch.Generator().manual_seed(user_seed(seed + 1, user_id))
    # PEFT writes into the config it is given (the base's name, at times target_modules) and keeps
    # it in the model: a shallow copy per user leaves the caller's as built, and shares its
    # target_modules set, so adapter_config.json lists them in the same order for every user.
    if init_adapter is None:
        peft_model = peft.get_peft_model(base_model, copy.copy(peft_config))
    else:
        peft_model = peft.PeftModel.from_pretrained(base_model, str(init_adapter), is_trainable=True)
        # named after the base it now trains over, as get_peft_model names a fresh one
        peft_model.peft_config["default"].base_model_name_or_path = base_model.__dict__.get("name_or_path") or None
    try:
        stats = _fit(peft_model, encoded, optim, epochs, shuffler, tokenizer.pad_token_id)
        peft_model.save_pretrained(str(out_dir))
    finally:
        remove_adapter(peft_model)
    return stats


def _fit(model, encoded: list[dict], optim: OptimSettings, epochs: int, shuffler, pad_id: int) -> TrainStats:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from oppu.models.samples import collate, target_loss

    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / optim.batch_size)
    total_steps = steps_per_epoch * epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(optim.warmup_ratio * total_steps), total_steps)
    device = next(model.parameters()).device
    model.train()
    stats = TrainStats(samples=len(encoded), epochs=epochs, steps=total_steps)
    for _ in range(epochs):
        order = torch.randperm(len(encoded), generator=shuffler).tolist()
        for first in range(0, len(order), optim.batch_size):
            batch = collate([encoded[i] for i in order[first:first + optim.batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = target_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.losses.append(float(loss.detach()))
            stats.target_tokens += int((batch["labels"] != -100).sum())
            stats.input_tokens += int(batch["attention_mask"].sum())
    model.eval()
    stats.final_loss = stats.losses[-1] if stats.losses else float("nan")
    stats.seconds = time.perf_counter() - start
    return stats

