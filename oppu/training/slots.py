"""The per-slot state of batched training: one flat buffer of every slot's LoRA, their initial
draws, and an AdamW whose every slot has its own moments, step count, learning rate and clipping.

``oppu.training.batched`` runs the loop over these; each piece is a few kernels over whole
buffers rather than a few per parameter (see ``FlatSlots``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from oppu.training.packing import to_device
from oppu.training.personal import user_seed

if TYPE_CHECKING:
    import torch


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
