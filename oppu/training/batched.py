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

The LoRA matrices and AdamW moments are kept in float32 while the base runs in its own dtype
(bf16 on GPU): updates of size lr * 1 would vanish in bf16 rounding.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oppu.errors import ConfigError
from oppu.ids import validate_user_id
from oppu.run_config import OptimSettings
from oppu.training.packing import Row, collate, collate_packed, group_by_length, pack_rows, to_device
from oppu.training.personal import user_seed

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from oppu.models.multi_lora import MultiLoraLinear
    from oppu.tasks.base import TrainingSample

    StateDict = dict[str, torch.Tensor]


@dataclass
class UserTrainStats:
    """What training one user's adapter took."""

    user_id: str
    samples: int
    epochs: int
    steps: int
    target_tokens: int = 0  # trained-on tokens, summed over epochs
    input_tokens: int = 0  # all real (non-padding) tokens processed, summed over epochs
    final_loss: float = float("nan")  # mean loss of the user's last step
    losses: list[float] = field(default_factory=list)  # mean loss of every step


@dataclass
class _UserRun:
    """A user's data, step plan and progress while it trains."""

    user_id: str
    encoded: list[dict[str, list[int]]]
    plan: list[list[int]]  # sample indices of every optimiser step, epochs concatenated
    warmup_steps: int
    stats: UserTrainStats
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


def init_user_slot(model, slot: int, seed: int, user_id: str) -> None:
    """Fresh adapter for ``user_id`` in ``slot``: PEFT's LoRA init (A Kaiming-uniform, B zero), seeded per user."""
    import torch

    from oppu.models.multi_lora import multi_lora_layers

    layers = list(multi_lora_layers(model).values())
    initial = to_device(initial_lora_a(layers, seed, user_id), layers[0].lora_A.device)
    offset = 0
    with torch.no_grad():
        for layer in layers:
            size = layer.rank * layer.in_features
            layer.lora_A[slot].copy_(initial[offset:offset + size].view(layer.rank, layer.in_features))
            layer.lora_B[slot].zero_()
            offset += size


def initial_lora_a(layers, seed: int, user_id: str, pin_memory: bool = False):
    """All layers' initial A, concatenated in layer order, drawn on the host (the same numbers on any device)."""
    import torch

    generator = torch.Generator().manual_seed(user_seed(seed, user_id))
    total = sum(layer.rank * layer.in_features for layer in layers)
    initial = torch.empty(total, dtype=torch.float32, pin_memory=pin_memory)
    offset = 0
    for layer in layers:
        lora_a = initial[offset:offset + layer.rank * layer.in_features].view(layer.rank, layer.in_features)
        torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        offset += lora_a.numel()
    return initial


class InitialDraws:
    """Queued users' initial ``A`` matrices, drawn on the host in a background thread ahead of their turn.

    A 7B-shaped model's ``A`` matrices take ~25 ms of host time to draw per user. Drawn when a
    slot frees, at a step boundary where the GPU's queue is nearly empty, the GPU would wait for
    every new user (profiled on an H100: most of the idle time of a 16-user run). The draws
    release the GIL, so they overlap the main thread's kernel launches.
    """

    def __init__(self, layers, seed: int):
        from concurrent.futures import ThreadPoolExecutor

        self._layers, self._seed = layers, seed
        self._pin = layers[0].lora_A.is_cuda
        # A few threads: a run starts by drawing every slot's user at once.
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="oppu-lora-init")
        self._futures: dict = {}

    def prefetch(self, user_ids: Sequence[str]) -> None:
        for user_id in user_ids:
            if user_id not in self._futures:
                self._futures[user_id] = self._pool.submit(initial_lora_a, self._layers, self._seed, user_id,
                                                           self._pin)

    def take(self, user_id: str):
        self.prefetch([user_id])
        return self._futures.pop(user_id).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class FlatSlots:
    """Every layer's stacked LoRA matrices as views of one ``[n_slots, total]`` float32 buffer.

    Slot ``s`` of the buffer holds all layers' ``A`` (layer order) then all their ``B``. The
    layers' ``lora_A`` / ``lora_B`` become parameters viewing it, and their gradients views of
    one gradient buffer of the same shape (autograd accumulates into an existing ``.grad`` in
    place), so the optimizer, clipping, zeroing and a slot's (re)initialisation are a handful
    of kernels over two buffers instead of a few per parameter (~3,000 launches per step for
    64 adapted layers).
    """

    def __init__(self, layers, n_slots: int):
        import torch
        from torch import nn

        device = layers[0].lora_A.device
        a_sizes = [layer.rank * layer.in_features for layer in layers]
        b_sizes = [layer.out_features * layer.rank for layer in layers]
        self.a_total = sum(a_sizes)
        self.data = torch.zeros(n_slots, self.a_total + sum(b_sizes), dtype=torch.float32, device=device)
        self.grad = torch.zeros_like(self.data)
        offset = 0
        for name, sizes in (("lora_A", a_sizes), ("lora_B", b_sizes)):
            for layer, size in zip(layers, sizes, strict=True):
                shape = getattr(layer, name).shape
                param = nn.Parameter(self.data[:, offset:offset + size].view(shape))
                param.grad = self.grad[:, offset:offset + size].view(shape)
                setattr(layer, name, param)
                offset += size
        # The optimizer's view of the whole buffer (it updates it in place, under no_grad).
        self.param = nn.Parameter(self.data, requires_grad=False)
        self.param.grad = self.grad

    def init_slot(self, slot: int, initial_a) -> None:
        """``init_user_slot`` for the whole buffer (``initial_a`` from ``initial_lora_a``): one copy, one fill."""
        import torch

        with torch.no_grad():
            self.data[slot, :self.a_total].copy_(to_device(initial_a, self.data.device))
            self.data[slot, self.a_total:].zero_()


@dataclass
class SlotSnapshot:
    """A slot's adapter (and its user's per-step losses) on their way to the host.

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


def snapshot_slot(model, slot: int, peft_config: LoraConfig, losses: torch.Tensor | None = None,
                  targets: set[str] | None = None) -> SlotSnapshot:
    """Start copying slot ``slot`` (the layers ``peft_config`` targets, cut to its rank) to the host.

    ``targets``: those layers' names, if the caller has them (matching them walks every module).
    """
    import torch

    from oppu.models.multi_lora import PEFT_PREFIX, multi_lora_layers

    if targets is None:
        targets = _target_module_names_of(model, peft_config)
    rank = peft_config.r
    names, parts = [], []
    for name, layer in multi_lora_layers(model).items():
        if name not in targets:
            continue
        if rank > layer.rank:
            raise ConfigError(f"peft_config.r={rank} exceeds the slots' rank {layer.rank} (layer {name!r})")
        for matrix, tensor in (("lora_A", layer.lora_A[slot, :rank]), ("lora_B", layer.lora_B[slot, :, :rank])):
            names.append((f"{PEFT_PREFIX}{name}.{matrix}.weight", tuple(tensor.shape)))
            parts.append(tensor.detach().reshape(-1))
    if not parts:
        raise ConfigError(f"peft_config.target_modules={peft_config.target_modules} selects no multi-LoRA layer")
    flat = torch.cat(parts)
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


def export_slot(model, slot: int, peft_config: LoraConfig) -> StateDict:
    """``export_slot_as_peft`` with one device-to-host copy for the whole adapter (one wait, not one per tensor)."""
    return snapshot_slot(model, slot, peft_config).state_dict()


def _target_module_names_of(model, peft_config: LoraConfig) -> set[str]:
    from peft.tuners.tuners_utils import check_target_module_exists

    from oppu.models.multi_lora import multi_lora_layers

    return {name for name in multi_lora_layers(model) if check_target_module_exists(peft_config, name)}


class SlotAdamW:
    """AdamW (torch.optim.AdamW's update) over stacked slot parameters, each slot its own state.

    ``torch.optim`` keeps one step count and one learning rate per parameter; here the first
    dimension of every parameter is the slot, and each slot has its own step count, learning
    rate and gradient clipping, and only the slots named in a step are updated.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], n_slots: int, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = list(params)
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * n_slots

    def reset_slot(self, slot: int) -> None:
        for moment in (*self.exp_avg, *self.exp_avg_sq):
            moment[slot].zero_()
        self.steps[slot] = 0

    def clip_grad_norms(self, slots: Sequence[int], max_norm: float) -> torch.Tensor:
        """Scale each slot's gradient to norm <= ``max_norm`` (torch's clip_grad_norm_ rule); the norms before."""
        import torch

        index = to_device(torch.tensor(slots), self.params[0].device)
        squared = sum(p.grad.index_select(0, index).flatten(1).pow(2).sum(1) for p in self.params)
        norms = squared.sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad.index_copy_(0, index, p.grad.index_select(0, index) * _per_slot(scale, p))
        return norms

    def step(self, slots: Sequence[int], lrs: Sequence[float]) -> None:
        import torch

        beta1, beta2 = self.betas
        for slot in slots:
            self.steps[slot] += 1
        device = self.params[0].device
        index = to_device(torch.tensor(slots), device)
        lr = torch.tensor(lrs, dtype=torch.float64)
        steps = torch.tensor([self.steps[s] for s in slots], dtype=torch.float64)
        bias_correction1 = 1 - beta1 ** steps
        bias_correction2_sqrt = (1 - beta2 ** steps).sqrt()
        decay = to_device((1 - lr * self.weight_decay).float(), device)
        step_size = to_device((lr / bias_correction1).float(), device)
        bias_correction2_sqrt = to_device(bias_correction2_sqrt.float(), device)
        with torch.no_grad():
            for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
                grad = p.grad.index_select(0, index)
                value = p.index_select(0, index).mul_(_per_slot(decay, p))
                m = exp_avg.index_select(0, index).lerp_(grad, 1 - beta1)
                v = exp_avg_sq.index_select(0, index).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / _per_slot(bias_correction2_sqrt, p)).add_(self.eps)
                value.sub_(_per_slot(step_size, p) * m / denom)
                p.index_copy_(0, index, value)
                exp_avg.index_copy_(0, index, m)
                exp_avg_sq.index_copy_(0, index, v)


def _per_slot(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-slot scalars shaped to broadcast over a stacked parameter's slot rows."""
    return values.view(-1, *([1] * (like.dim() - 1)))


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
    on_user_done: Callable[[str, StateDict, UserTrainStats], None] | None = None,
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
    ``base_model`` is frozen and used in place; its layers are restored before returning.
    """
    import torch

    from oppu.models.multi_lora import (
        _check_supported,
        inject_multi_lora,
        model_adapters,
        multi_lora_layers,
        peft_scaling,
        remove_multi_lora,
    )
    from oppu.training.varlen import packed_attention, packed_attention_calls, packed_forward_kwargs

    _check_supported(peft_config)
    runs = _plan_users(tokenizer, users, hparams, seed, epochs)
    if tokens_per_forward < hparams.max_length:
        raise ConfigError(f"tokens_per_forward={tokens_per_forward} is below max_length={hparams.max_length}: "
                          "a full-length sample would not fit a micro-batch")
    n_slots = max(1, min(max_active_users, len(runs)))
    targets = _target_module_names(base_model, peft_config)
    inject_multi_lora(base_model, targets, n_slots=n_slots, rank=peft_config.r, alpha=peft_config.lora_alpha,
                      dropout=peft_config.lora_dropout, dtype=torch.float32)
    was_training = base_model.training
    draws = None
    try:
        layers: list[MultiLoraLinear] = list(multi_lora_layers(base_model).values())
        for layer in layers:
            layer.scaling.fill_(peft_scaling(peft_config))
        flat = FlatSlots(layers, n_slots)
        optimizer = SlotAdamW([flat.param], n_slots, hparams.weight_decay)
        draws = InitialDraws(layers, seed)
        exported = set(targets)  # the wrapped layers, by the names snapshots look them up by
        if gradient_checkpointing:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base_model.train()
        device = layers[0].lora_A.device
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
            loss_history: list[torch.Tensor] = []  # per global step: each slot's mean loss
            pending: list[tuple[_UserRun, SlotSnapshot]] = []  # finished users whose copies are under way

            def finish(wait: bool) -> None:
                """Hand over the finished users whose adapters have reached the host (all, if ``wait``)."""
                waiting = []
                for run, snapshot in pending:
                    if not wait and not snapshot.ready():
                        waiting.append((run, snapshot))
                        continue
                    state = snapshot.state_dict()
                    run.stats.losses = snapshot.losses.tolist()
                    run.stats.final_loss = run.stats.losses[-1]
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
                        micro_batches = pack_rows(rows, tokens_per_forward, width_multiple)
                    else:
                        micro_batches = group_by_length(rows, tokens_per_forward, batch_overhead_tokens,
                                                        width_multiple)
                for micro_batch in micro_batches:
                    with phase("collate"):
                        batch = (collate_packed if packed else collate)(micro_batch, pad_id, device)
                    with model_adapters(base_model, batch["owners"]), phase("pass"):
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
                    optimizer.clip_grad_norms(slots, hparams.max_grad_norm)
                    optimizer.step(slots, lrs)
                loss_history.append(slot_losses)
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
            return adapters
    finally:
        if draws is not None:
            draws.close()
        if gradient_checkpointing:
            base_model.gradient_checkpointing_disable()
        remove_multi_lora(base_model)
        base_model.train(was_training)


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

    from oppu.models.samples import encode_sample

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
        encoded = [s if isinstance(s, dict) else encode_sample(tokenizer, s, hparams.max_length) for s in samples]
        for i, sample in enumerate(encoded):
            if len(sample["input_ids"]) > hparams.max_length:
                raise ValueError(f"user {user_id!r} sample {i} has {len(sample['input_ids'])} tokens, "
                                 f"more than max_length={hparams.max_length}")
        shuffler = torch.Generator().manual_seed(user_seed(seed + 1, user_id))
        plan = step_plan(len(encoded), hparams.batch_size, user_epochs, shuffler)
        runs.append(_UserRun(user_id=user_id, encoded=encoded, plan=plan,
                             warmup_steps=int(hparams.warmup_ratio * len(plan)),
                             stats=UserTrainStats(user_id, len(encoded), user_epochs, len(plan))))
    return runs


def _target_module_names(model, peft_config: LoraConfig) -> list[str]:
    """Full names of the ``nn.Linear`` modules ``peft_config`` targets (PEFT's own matching rule)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn

    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and check_target_module_exists(peft_config, name)]
    if not names:
        raise ConfigError(f"peft target_modules={peft_config.target_modules} match no nn.Linear of the model")
    return names
