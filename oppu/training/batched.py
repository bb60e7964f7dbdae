"""Train many users' personal LoRA adapters together over one frozen base.

Every user in training owns a slot of a multi-LoRA model (``oppu.models.multi_lora``). A global
step takes each active user's next optimiser step (``batch_size`` of that user's samples), pools
all their rows, cuts the pool into length-grouped micro-batches (``oppu.training.packing``) and
runs forward/backward over rows of many users at once; every row goes through its own user's
LoRA. The loss of a row is divided by its user's target-token count for the step, so the
gradient a slot receives is exactly the gradient of that user's own mean loss. Then each user
gets its own gradient-norm clipping, its own AdamW update (own moments, own step count) and its
own learning rate from its own warmup-and-linear-decay schedule, over its own number of steps.
A user who has done all epochs hands its slot to the next user in the queue.

Nothing a user's adapter depends on comes from the other users: initialisation and sample order
are seeded from (seed, user id) alone (as ``oppu.training.personal`` seeds them), so an adapter
comes out the same, up to floating-point summation order, trained alone or in any company.
LoRA dropout is the exception: its random masks are drawn per pass, so with dropout > 0 the
adapters are equal in distribution only.

That holds for a user whose loss or gradients stop being finite too: every LoRA kernel selects
a slot's own tokens (``oppu.models.multi_lora``), never scales the others' by zero, and the
optimiser's clipping and update are per slot, so NaNs stay in their slot. Such a user fails
alone: its per-step losses and gradient norms, and its final weights, are checked when its
adapter reaches the host (with no extra device sync), and it is handed to ``on_user_failed``
with the first step that went wrong instead of to ``on_user_done``.

The LoRA matrices and AdamW moments are kept in float32 while the base runs in its own dtype
(bf16 on GPU): updates of size lr * 1 would vanish in bf16 rounding. The slots' buffers and
optimiser are ``oppu.training.slots``; a finished user's slot goes out through
``oppu.models.slot_export``, the one PEFT export.

The base may compute in FP8 (``users.base_precision``: ``oppu.models.fp8.set_base_precision``,
applied by the caller once per base load): the slots wrap its FP8 layers as they wrap any
``nn.Linear``, and stay float32 themselves.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from oppu.errors import ConfigError, NonFiniteError
from oppu.ids import validate_user_id
from oppu.run_config import OptimSettings
from oppu.training.packing import Row, collate, collate_packed, group_by_length, pack_rows, to_device
from oppu.training.personal import TrainStats, user_seed
from oppu.training.slots import FlatSlots, InitialDraws, SlotAdamW

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from oppu.models.multi_lora import MultiLoraLinear
    from oppu.models.slot_export import SlotSnapshot
    from oppu.tasks.base import TrainingSample

    StateDict = dict[str, torch.Tensor]


@dataclass
class _UserRun:
    """A user's data, step plan and progress while it trains."""

    user_id: str
    encoded: list[dict[str, list[int]]]
    plan: list[list[int]]  # sample indices of every optimiser step, epochs concatenated
    warmup_steps: int
    stats: TrainStats
    next_step: int = 0
    slot: int = -1

    @property
    def total_steps(self) -> int:
        return len(self.plan)


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): transformers' linear schedule with warmup."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def step_plan(n_samples: int, batch_size: int, epochs: int, shuffler: torch.Generator) -> list[list[int]]:
    """Sample indices of every optimiser step: a fresh permutation per epoch, cut into batches."""
    import torch

    plan = []
    for _ in range(epochs):
        order = torch.randperm(n_samples, generator=shuffler).tolist()
        plan.extend(order[first:first + batch_size] for first in range(0, n_samples, batch_size))
    return plan


def train_users_batched(
    base_model,
    tokenizer,
    users: Sequence[tuple[str, Sequence[TrainingSample | dict[str, list[int]]]]],
    peft_config: LoraConfig,
    hparams: OptimSettings,
    seed: int,
    *,
    epochs: int | Mapping[str, int] | None = None,
    max_active_users: int = 8,
    tokens_per_forward: int = 16384,
    batch_overhead_tokens: int = 256,
    width_multiple: int = 64,
    packed: bool = True,
    gradient_checkpointing: bool = False,
    on_user_done: Callable[[str, StateDict, TrainStats], None] | None = None,
    on_user_failed: Callable[[str, NonFiniteError], None] | None = None,
) -> dict[str, StateDict]:
    """Train one LoRA adapter per user, up to ``max_active_users`` at a time; returns PEFT state dicts.

    ``users`` pairs a user id with its samples (``TrainingSample``, encoded here with
    ``hparams.max_length``, or already encoded ``{"input_ids", "labels"}``). ``epochs`` is one
    count for all, or per user id; default ``hparams.epochs``. ``tokens_per_forward`` bounds a
    micro-batch's tokens, padding included (activation memory). ``packed`` (default) lays the
    step's samples end to end in passes of ``tokens_per_forward`` tokens with attention kept
    within each sample (``oppu.training.varlen``; transformers models) and selects the LoRA per
    token; ``packed=False`` runs one sample per row, rows grouped by length and right-padded
    (any model whose attention is causal). ``on_user_done`` is called as soon as a user's
    adapter has reached the host (the copy runs behind the GPU's work, so this can be a global
    step after the user's last one), with the state dict in PEFT's saved format
    (``PeftModel.from_pretrained`` loads it next to ``peft_config``), so a caller can store
    adapters while others still train.
    A user whose loss, gradient norm or weights are not finite gets no adapter: it goes to
    ``on_user_failed`` (a ``NonFiniteError`` naming the user and the step), and the others
    train as if it had not been there; without ``on_user_failed``, the first such error is
    raised once every other user is done (their ``on_user_done`` calls made).
    ``base_model`` is frozen and used in place; its layers are restored before returning.
    """
    import torch

    from oppu.models.multi_lora import (
        check_supported,
        inject_lora_slots,
        model_adapters,
        multi_lora_layers,
        remove_multi_lora,
    )
    from oppu.models.slot_export import snapshot_slot
    from oppu.models.span_lora import GROUP_ALIGN, grouped_mm_available
    from oppu.training.varlen import packed_attention, packed_attention_calls, packed_forward_kwargs

    started = time.perf_counter()
    check_supported(peft_config)
    runs = _plan_users(tokenizer, users, hparams, seed, epochs)
    if tokens_per_forward < hparams.max_length:
        raise ConfigError(f"tokens_per_forward={tokens_per_forward} is below max_length={hparams.max_length}: "
                          "a full-length sample would not fit a micro-batch")
    n_slots = max(1, min(max_active_users, len(runs)))
    inject_lora_slots(base_model, peft_config, n_slots=n_slots, dtype=torch.float32)
    was_training = base_model.training
    draws = None
    try:
        layers: list[MultiLoraLinear] = list(multi_lora_layers(base_model).values())
        flat = FlatSlots(layers, n_slots)
        optimizer = SlotAdamW([flat.param], n_slots, hparams.weight_decay)
        draws = InitialDraws(layers, seed)
        exported = set(multi_lora_layers(base_model))  # the wrapped layers: what snapshots export
        if gradient_checkpointing:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base_model.train()
        device = layers[0].lora_A.device
        # Each user's block of a pass padded to where the grouped GEMM reads it in place (span_lora).
        # (A pass budget off that grid could not always hold a long sample's padded block.)
        owner_align = (GROUP_ALIGN if packed and grouped_mm_available(device) and tokens_per_forward % GROUP_ALIGN == 0
                       else 1)
        decoder, head = base_model.get_decoder(), base_model.get_output_embeddings()
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

        attention = packed_attention(base_model) if packed else contextlib.nullcontext()
        with fixed_plan_attention(), attention, warnings.catch_warnings():
            # The layers' gradients are strided views of one buffer, on purpose (FlatSlots).
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            # Longest plans first, so the last global steps are not one long user training alone.
            queue = sorted(runs, key=lambda run: (-run.total_steps, run.user_id))
            draws.prefetch([run.user_id for run in queue[:n_slots]])
            free_slots = list(range(n_slots - 1, -1, -1))
            active: dict[int, _UserRun] = {}
            adapters: dict[str, StateDict] = {}
            # Per global step, [n_slots, 2]: each slot's mean loss and gradient norm (before clipping).
            loss_history: list[torch.Tensor] = []
            failures: list[NonFiniteError] = []
            pending: list[tuple[_UserRun, SlotSnapshot]] = []  # finished users whose copies are under way

            def finish(wait: bool) -> None:
                """Hand over the finished users whose adapters have reached the host (all, if ``wait``)."""
                waiting = []
                for run, snapshot in pending:
                    if not wait and not snapshot.ready():
                        waiting.append((run, snapshot))
                        continue
                    state = snapshot.state_dict()
                    losses, grad_norms = snapshot.losses.unbind(1)
                    error = nonfinite_error(run.user_id, losses, grad_norms, snapshot.adapter)
                    if error is not None:  # never handed over, so never published
                        failures.append(error)
                        if on_user_failed is not None:
                            on_user_failed(run.user_id, error)
                        continue
                    run.stats.losses = losses.tolist()
                    run.stats.final_loss = run.stats.losses[-1]
                    run.stats.seconds = time.perf_counter() - started
                    adapters[run.user_id] = state
                    if on_user_done is not None:
                        on_user_done(run.user_id, state, run.stats)
                pending[:] = waiting

            while queue or active:
                with phase("start users"):
                    while queue and free_slots:
                        run = queue.pop(0)
                        run.slot = free_slots.pop()
                        flat.init_slot(run.slot, draws.take(run.user_id))
                        optimizer.reset_slot(run.slot)
                        active[run.slot] = run
                    draws.prefetch([run.user_id for run in queue[:n_slots]])

                with phase("step rows"):
                    rows: list[Row] = []
                    inverse_targets = torch.zeros(n_slots, dtype=torch.float32)
                    for slot, run in active.items():
                        step_rows = [Row(slot, i, run.encoded[i]["input_ids"], run.encoded[i]["labels"])
                                     for i in run.plan[run.next_step]]
                        targets_in_step = sum(row.target_tokens for row in step_rows)
                        inverse_targets[slot] = 1.0 / max(1, targets_in_step)
                        run.stats.target_tokens += targets_in_step
                        run.stats.input_tokens += sum(len(row) for row in step_rows)
                        rows.extend(step_rows)
                    inverse_targets = to_device(inverse_targets, device)

                    flat.grad.zero_()  # not None: the layers' gradients are views of it
                    slot_losses = torch.zeros(n_slots, device=device)
                    if packed:
                        micro_batches = pack_rows(rows, tokens_per_forward, width_multiple, owner_align)
                    else:
                        micro_batches = group_by_length(rows, tokens_per_forward, batch_overhead_tokens,
                                                        width_multiple)
                for micro_batch in micro_batches:
                    with phase("collate"):
                        batch = (collate_packed(micro_batch, pad_id, device, owner_align) if packed
                                 else collate(micro_batch, pad_id, device))
                    with model_adapters(base_model, batch["owners"], batch.get("owner_spans")), phase("pass"):
                        if packed:
                            calls = packed_attention_calls()
                            hidden = decoder(**packed_forward_kwargs(batch)).last_hidden_state
                            if packed_attention_calls() == calls:
                                raise ConfigError(f"{type(base_model).__name__} does not run its attention through "
                                                  "transformers' AttentionInterface, so packed samples would "
                                                  "attend to each other: train it with users.trainer=per-user")
                            predicting = hidden.reshape(-1, hidden.shape[-1])
                        else:
                            hidden = decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
                            predicting = hidden[:, :-1].reshape(-1, hidden.shape[-1])
                        # Only trained positions go through the LM head: prompts are most tokens.
                        logits = head(predicting.index_select(0, batch["trained_positions"])).float()
                        token_losses = torch.nn.functional.cross_entropy(logits, batch["trained_labels"],
                                                                         reduction="none")
                        weighted = token_losses * inverse_targets[batch["trained_owners"]]
                        with phase("backward"):
                            weighted.sum().backward()
                    slot_losses.index_add_(0, batch["trained_owners"], weighted.detach())

                slots = sorted(active)
                lrs = [hparams.lr * linear_warmup_decay(active[s].next_step, active[s].warmup_steps,
                                                        active[s].total_steps) for s in slots]
                with phase("optimizer"):
                    grad_norms = torch.zeros(n_slots, device=device)
                    grad_norms.index_copy_(0, to_device(torch.tensor(slots), device),
                                           optimizer.clip_grad_norms(slots, hparams.max_grad_norm))
                    optimizer.step(slots, lrs)
                # Read on the host only with the user's adapter (no sync here): see finish().
                loss_history.append(torch.stack([slot_losses, grad_norms], 1))
                with phase("finish users"):
                    for slot in slots:
                        run = active[slot]
                        run.next_step += 1
                        if run.next_step == run.total_steps:
                            # Copied out behind the GPU's work; the slot takes its next user at once.
                            losses = torch.stack(loss_history[-run.total_steps:])[:, slot]
                            pending.append((run, snapshot_slot(base_model, slot, peft_config, losses, exported)))
                            del active[slot]
                            free_slots.append(slot)
                    kept_steps = max((run.next_step for run in active.values()), default=0)
                    del loss_history[:len(loss_history) - kept_steps]
                    finish(wait=False)
            finish(wait=True)
            if failures and on_user_failed is None:
                raise failures[0]
            return adapters
    finally:
        if draws is not None:
            draws.close()
        if gradient_checkpointing:
            base_model.gradient_checkpointing_disable()
        remove_multi_lora(base_model)
        base_model.train(was_training)


def nonfinite_error(user_id: str, losses, grad_norms, weights) -> NonFiniteError | None:
    """The error for a user whose per-step ``losses`` / ``grad_norms`` or final ``weights`` (host
    tensors) are not all finite, naming the first step that went wrong; None if all are."""
    import torch

    steps = len(losses)
    for name, values in (("loss", losses), ("gradient norm", grad_norms)):
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step = int(bad[0])
            return NonFiniteError(f"user {user_id!r}: {name} is {float(values[step])} at optimiser step "
                                  f"{step + 1} of {steps}; its adapter is not published", user=user_id, step=step + 1)
    if not bool(torch.isfinite(weights).all()):
        return NonFiniteError(f"user {user_id!r}: adapter weights are not finite after optimiser step {steps} "
                              f"of {steps}; its adapter is not published", user=user_id, step=steps)
    return None


def phase(name: str):
    """A named span (``oppu/<name>``) in torch.profiler traces; next to free when no profiler runs."""
    import torch

    return torch.profiler.record_function(f"oppu/{name}")


def fixed_plan_attention():
    """SDPA without the cuDNN backend: it builds (and compiles) an execution plan for every new
    shape, and length-grouped micro-batches rarely repeat one. Profiled on an H100: 2.3 ms of CPU
    per cuDNN attention backward call plus runtime-compiled kernels, the GPU busy 17% of the wall
    time (docs/performance-training.md). Flash attention has no per-shape plan."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _plan_users(tokenizer, users, hparams: OptimSettings, seed: int,
                epochs: int | Mapping[str, int] | None) -> list[_UserRun]:
    import torch

    from oppu.models.samples import encode_samples

    runs: list[_UserRun] = []
    seen: set[str] = set()
    for user_id, samples in users:
        validate_user_id(user_id)
        if user_id in seen:
            raise ValueError(f"user {user_id!r} appears twice in the batch")
        seen.add(user_id)
        if not samples:
            raise ValueError(f"user {user_id!r} has no training samples")
        user_epochs = epochs.get(user_id, hparams.epochs) if isinstance(epochs, Mapping) else (
            epochs if epochs is not None else hparams.epochs)
        if user_epochs is None or user_epochs < 1:
            raise ConfigError(f"no epoch count for user {user_id!r}: pass epochs= or set optim.epochs "
                              f"(got {user_epochs!r})")
        raw = [i for i, s in enumerate(samples) if not isinstance(s, dict)]
        encoded = list(samples)
        for i, sample in zip(raw, encode_samples(tokenizer, [samples[i] for i in raw], hparams.max_length),
                             strict=True):
            encoded[i] = sample
        for i, sample in enumerate(encoded):
            if len(sample["input_ids"]) > hparams.max_length:
                raise ValueError(f"user {user_id!r} sample {i} has {len(sample['input_ids'])} tokens, "
                                 f"more than max_length={hparams.max_length}")
        shuffler = torch.Generator().manual_seed(user_seed(seed + 1, user_id))
        plan = step_plan(len(encoded), hparams.batch_size, user_epochs, shuffler)
        runs.append(_UserRun(user_id=user_id, encoded=encoded, plan=plan,
                             warmup_steps=int(hparams.warmup_ratio * len(plan)),
                             stats=TrainStats(len(encoded), user_epochs, len(plan))))
    return runs


