"""Per-token LoRA for packed rows of many users: each slot's matmuls over its own tokens, batched.

A packed training pass lays samples of many users end to end; every token carries its user's
slot, and the tokens come in runs of one slot (``spans``: ``(slot, start, end)`` over the
flattened tokens). The update is ``out[t] += scaling[s] * B[s] @ (A[s] @ x[t])`` for every run
``(s, start, end)`` and token ``t`` in it.

One pair of matmuls per run costs eight kernel launches per layer per run (forward and
backward): at 50 users in a pass of a 30-layer, 7-target model, 80,000 launches, which kept an
H100 9% busy on SmolLM2-135M. :class:`SpanPlan` instead gathers the runs into a few groups of
similar length (at most ``MAX_PADDING`` times the shortest run's length in a group), each
padded to its longest run, and runs one batched matmul per group: the launches per layer no
longer grow with the number of runs.

Isolation is kept: every batch entry of a group is one run of one slot, its padding positions
are *selected* to zero (``torch.where``, never multiplied by zero: ``0 * NaN`` is NaN), and only
the run's own positions are added back. So a slot's update and gradient read its own tokens
and matrices and nothing else, and a diverged user's NaNs stay in its slot.

Where torch's grouped GEMM runs natively (``torch.nn.functional.grouped_mm``: CUTLASS on an
H100/B200 in bf16, and the CPU), :func:`grouped_update` does the same with one grouped GEMM each
way over all runs at once, each run its own group and its own slot's matrices: 51 operators
per layer forward and backward where the padded groups took 96 for a 50-user pass
(``bench/span_lora_ops.py``), and no padding to a group's longest run. Each run is copied into a
layout from a multiple of ``GROUP_ALIGN`` tokens (its tail zeros), which the weight-gradient GEMM
needs: its groups split the token dimension it sums over.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

MAX_PADDING = 2.0  # a group's longest run is at most this many times its shortest
GROUP_ALIGN = 16  # tokens: where each run starts in the grouped GEMM's layout (16 bf16 = 32 bytes)


@dataclass(frozen=True)
class SpanGroup:
    """Runs of similar length, padded to the longest: on the model's device."""

    slots: torch.Tensor  # [g]: each run's slot
    tokens: torch.Tensor  # [g, L]: each position's flattened token index (0 on padding)
    valid: torch.Tensor  # [g, L, 1]: a run's own position (not padding)
    positions: torch.Tensor  # [n]: the valid positions of the [g * L] flattening, in order
    targets: torch.Tensor  # [n]: the token index of each of those positions


@dataclass(frozen=True)
class AlignedRuns:
    """Every run in one layout for the grouped GEMM, each from a multiple of ``GROUP_ALIGN``: on the device."""

    slots: torch.Tensor  # [R]: each run's slot
    offsets: torch.Tensor  # [R] int32: where each run's stretch of the layout ends
    positions: torch.Tensor | None  # [n]: the valid layout positions, in order (None: in place)
    targets: torch.Tensor | None  # [n]: the token index of each of those positions (None: in place)
    layout_tokens: int = 0  # P
    prefix_tokens: int | None = None  # n, when the runs are tokens 0..n-1 in order (packed training)
    # The runs already lie as the layout would put them (contiguous from token 0, each a multiple of
    # GROUP_ALIGN long: ``collate_packed(..., owner_align=GROUP_ALIGN)``): the tokens are read in place.
    in_place: bool = False
    # With ``in_place`` and one run per slot in slot order: where each of the ``n_slots`` slots' runs
    # ends, absent slots as empty groups, so the GEMMs read every slot's matrices without gathering them.
    slot_offsets: torch.Tensor | None = None


@dataclass(frozen=True)
class SpanPlan:
    """The runs of one pass, laid out for the grouped GEMM and (on first use: only where a layer
    cannot take the grouped GEMM) grouped for padded batched matmuls; built once, used by every layer."""

    spans: tuple[tuple[int, int, int], ...]
    device: torch.device
    aligned: AlignedRuns | None = None

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int, int]], device: torch.device | str,
              n_slots: int | None = None) -> SpanPlan:
        """``n_slots``: how many slots the layers hold (lets runs laid out in place skip gathering them)."""
        device = torch.device(device)
        aligned = _aligned(spans, device, n_slots) if spans and grouped_mm_available(device) else None
        return cls(tuple(spans), device, aligned)

    @functools.cached_property
    def groups(self) -> tuple[SpanGroup, ...]:
        """The runs in groups of similar length (at most ``MAX_PADDING`` apart), for ``SpanLora``."""
        ordered = sorted(self.spans, key=lambda span: span[2] - span[1], reverse=True)
        groups, current = [], []
        for span in ordered:
            if current and (current[0][2] - current[0][1]) > MAX_PADDING * (span[2] - span[1]):
                groups.append(current)
                current = []
            current.append(span)
        if current:
            groups.append(current)
        return tuple(_group(runs, self.device) for runs in groups)


def _aligned(spans: Sequence[tuple[int, int, int]], device: torch.device, n_slots: int | None = None) -> AlignedRuns:
    if _lie_in_place(spans):
        slot_order = [slot for slot, _, _ in spans]
        host = {"slots": torch.tensor(slot_order), "offsets": torch.tensor([end for _, _, end in spans], dtype=torch.int32)}
        if n_slots is not None and slot_order == sorted(set(slot_order)) and slot_order[-1] < n_slots:
            ends, offsets, running = {slot: end for slot, _, end in spans}, [], 0
            for slot in range(n_slots):  # an absent slot: an empty group where the previous run ended
                running = ends.get(slot, running)
                offsets.append(running)
            host["slot_offsets"] = torch.tensor(offsets, dtype=torch.int32)
        on_device = _to_device(host, device)
        n = spans[-1][2]
        return AlignedRuns(on_device["slots"], on_device["offsets"], positions=None, targets=None, layout_tokens=n,
                           prefix_tokens=n, in_place=True, slot_offsets=on_device.get("slot_offsets"))
    slots = torch.tensor([slot for slot, _, _ in spans])
    starts = torch.tensor([start for _, start, _ in spans])
    lengths = torch.tensor([end - start for _, start, end in spans])
    stretches = (lengths + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    offsets = stretches.cumsum(0)
    run_of = torch.repeat_interleave(torch.arange(len(spans)), stretches)
    within = torch.arange(int(offsets[-1])) - (offsets - stretches)[run_of]
    valid = within < lengths[run_of]
    sources = torch.where(valid, starts[run_of] + within, 0)
    positions = valid.nonzero().squeeze(1)
    targets = sources[positions]
    prefix = len(targets) if torch.equal(targets, torch.arange(len(targets))) else None
    host = {"slots": slots, "offsets": offsets.to(torch.int32), "positions": positions, "targets": targets}
    return AlignedRuns(**_to_device(host, device), layout_tokens=int(offsets[-1]), prefix_tokens=prefix)


def _lie_in_place(spans: Sequence[tuple[int, int, int]]) -> bool:
    """Whether the runs are contiguous from token 0, each a multiple of ``GROUP_ALIGN`` tokens long."""
    expected_start = 0
    for _, start, end in spans:
        if start != expected_start or (end - start) % GROUP_ALIGN or end <= start:
            return False
        expected_start = end
    return True


def _to_device(host: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        host = {name: tensor.pin_memory() for name, tensor in host.items()}
    return {name: tensor.to(device, non_blocking=True) for name, tensor in host.items()}


_GROUPED_MM_BROKEN: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) where it raised


def grouped_mm_available(device: torch.device) -> bool:
    """Whether torch's grouped GEMM runs natively on ``device`` (else it loops over groups with a
    device sync, slower than the padded groups): the CPU, or a CUDA GPU of compute capability 9 or
    10 (H100, H200, B200) for bf16. ``OPPU_GROUPED_LORA=0`` turns it off (the padded groups then)."""
    if os.environ.get("OPPU_GROUPED_LORA", "1") == "0" or not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_mm_fits(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether this layer's operands suit the grouped GEMM: a native dtype (bf16 on a GPU; float32
    too on the CPU), every row stride a multiple of 16 bytes, and no earlier failure of it here."""
    if (x.device.type, x.dtype) in _GROUPED_MM_BROKEN:
        return False
    native = (torch.bfloat16,) if x.device.type == "cuda" else (torch.bfloat16, torch.float32)
    if x.dtype not in native or lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        return False
    size = x.element_size()
    return all(dim * size % 16 == 0 for dim in (lora_a.shape[1], lora_a.shape[2], lora_b.shape[1]))


def grouped_update(result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: torch.Tensor, runs: AlignedRuns) -> torch.Tensor:
    """``SpanLora``'s update through two grouped GEMMs, one group per run (autograd's own backward).

    ``result`` (the base output) gains ``scaling[s] * B[s] @ (A[s] @ x[t])`` on every run's tokens,
    in place. The scaling is folded into the run's ``B`` (exact for the usual power-of-two
    ``alpha / r``; otherwise one rounding apart from scaling ``A x``). A run's tail in the layout
    is zeros, so it adds nothing to its slot's gradients, and its outputs are dropped.

    No step scatters by addition: tokens go into the layout and come out of it by copies whose
    gradients are copies too (``_UniqueRows``), and where the runs are the pass's first tokens in
    order (packed training) the update is added to that slice. Addition by index (``index_add_``,
    atomics) was 31% of the GPU's time in a SmolLM2-135M batched step on an H100 (2026-12-07).
    """
    grouped_mm = torch.nn.functional.grouped_mm
    out = result.view(-1, result.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    if runs.in_place:
        return _in_place_update(result, out, rows, lora_a, lora_b, scaling, runs)
    prefix = runs.prefix_tokens
    own = rows[:prefix] if prefix is not None else _UniqueRows.apply(rows, runs.targets)
    laid_out = own.new_zeros(runs.layout_tokens, own.shape[1]).index_copy(0, runs.positions, own)  # [P, in]
    a = lora_a.index_select(0, runs.slots).transpose(1, 2)  # [R, in, r]
    b = lora_b.index_select(0, runs.slots) * scaling.index_select(0, runs.slots).to(lora_b.dtype)[:, None, None]
    hidden = grouped_mm(laid_out, a, offs=runs.offsets)  # [P, r]
    delta = _UniqueRows.apply(grouped_mm(hidden, b.transpose(1, 2), offs=runs.offsets), runs.positions)  # [n, out]
    if prefix is not None:
        out[:prefix].add_(delta)
    else:
        out.index_add_(0, runs.targets, delta)
    return result


def _in_place_update(result, out, rows, lora_a, lora_b, scaling, runs: AlignedRuns) -> torch.Tensor:
    """``grouped_update`` for runs that already lie in the layout: the tokens are the GEMM's rows,
    and with ``slot_offsets`` every slot is a group (absent ones empty), so no slot's matrices are
    gathered. About half the operators of the general path, forward and backward."""
    grouped_mm = torch.nn.functional.grouped_mm
    n = runs.layout_tokens
    own = rows if n == rows.shape[0] else rows[:n]
    if runs.slot_offsets is not None and empty_groups_work(rows.device, rows.dtype):
        a, b, scale, offsets = lora_a, lora_b, scaling, runs.slot_offsets
    else:
        a, b, scale, offsets = (lora_a.index_select(0, runs.slots), lora_b.index_select(0, runs.slots),
                                scaling.index_select(0, runs.slots), runs.offsets)
    b = b * scale.to(b.dtype)[:, None, None]
    delta = grouped_mm(grouped_mm(own, a.transpose(1, 2), offs=offsets), b.transpose(1, 2), offs=offsets)
    (out if n == out.shape[0] else out[:n]).add_(_ContiguousGrad.apply(delta))
    return result


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous: the grouped GEMM's backward refuses a gradient
    with zero strides (an ``expand``, as ``out.sum().backward()`` hands down)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@functools.cache
def empty_groups_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM takes empty groups here (an absent slot's): checked once, on a small
    case against plain matmuls, forward and weight gradient; where it does not, slots are gathered."""
    try:
        x = torch.randn(2 * GROUP_ALIGN, GROUP_ALIGN, device=device, dtype=dtype)
        w = torch.randn(3, GROUP_ALIGN, GROUP_ALIGN, device=device, dtype=dtype, requires_grad=True)
        offsets = torch.tensor([GROUP_ALIGN, GROUP_ALIGN, 2 * GROUP_ALIGN], device=device, dtype=torch.int32)
        out = torch.nn.functional.grouped_mm(x, w, offs=offsets)
        out.backward(torch.ones_like(out))
        expected = torch.cat([x[:GROUP_ALIGN] @ w[0], x[GROUP_ALIGN:] @ w[2]]).float()
        tolerance = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        return bool(torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance)
                    and torch.count_nonzero(w.grad[1]) == 0 and torch.isfinite(w.grad).all())
    except RuntimeError as exc:
        logger.info("torch's grouped GEMM refuses empty groups on %s %s (%s): slots are gathered", device, dtype, exc)
        return False


class _UniqueRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for an ``index`` without repeats, whose gradient is written back
    by copy (``index_copy_`` into zeros), not added by index as ``index_select``'s is."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros((ctx.rows, *grad.shape[1:])).index_copy_(0, index, grad), None


def lora_update(result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: torch.Tensor, plan: SpanPlan) -> torch.Tensor:
    """The per-token LoRA update of ``plan``'s runs added to ``result`` in place: through the grouped
    GEMM where it runs natively and the layer's operands suit it, else through ``SpanLora``.

    Should the grouped GEMM raise (a build without its kernels, a layout it refuses), that device
    and dtype go back to ``SpanLora`` for the rest of the process, with one warning.
    """
    if plan.aligned is not None and grouped_mm_fits(x, lora_a, lora_b):
        try:
            return grouped_update(result, x, lora_a, lora_b, scaling, plan.aligned)
        except RuntimeError as exc:
            _GROUPED_MM_BROKEN.add((x.device.type, x.dtype))
            logger.warning("torch's grouped GEMM failed on %s %s (%s: %s): the LoRA runs go through padded "
                           "batched matmuls from now on", x.device.type, x.dtype, type(exc).__name__, exc)
    return SpanLora.apply(result, x, lora_a, lora_b, scaling, plan)


def _group(runs: list[tuple[int, int, int]], device: torch.device) -> SpanGroup:
    width = runs[0][2] - runs[0][1]
    offsets = torch.arange(width)
    starts = torch.tensor([start for _, start, _ in runs])
    lengths = torch.tensor([end - start for _, start, end in runs])
    valid = offsets[None, :] < lengths[:, None]
    tokens = torch.where(valid, starts[:, None] + offsets[None, :], 0)
    positions = valid.reshape(-1).nonzero().squeeze(1)
    host = {"slots": torch.tensor([slot for slot, _, _ in runs]), "tokens": tokens, "valid": valid[:, :, None],
            "positions": positions, "targets": tokens.reshape(-1)[positions]}
    return SpanGroup(**_to_device(host, device))


class SpanLora(torch.autograd.Function):
    """``out[t] += scaling[s] * B[s] @ (A[s] @ x[t])`` over ``plan``'s runs, one batched matmul a group.

    ``result`` is the base layer's fresh output, updated in place (the base's backward does not
    need it); tokens in no run (padding, slot -1) keep the base output. ``lora_a`` / ``lora_b``
    are the stacked matrices already in the activations' dtype; ``A x`` is rounded to that
    dtype, then scaled, as the PEFT layer rounds.
    """

    @staticmethod
    def forward(ctx, result, x, lora_a, lora_b, scaling, plan: SpanPlan):
        out = result.view(-1, result.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        scaling = scaling.to(x.dtype)
        hiddens = []
        for group in plan.groups:
            xs = torch.where(group.valid, rows[group.tokens], 0)  # [g, L, in]
            hidden = torch.bmm(xs, lora_a[group.slots].transpose(1, 2)) * scaling[group.slots][:, None, None]
            delta = torch.bmm(hidden.to(out.dtype), lora_b[group.slots].transpose(1, 2))  # [g, L, out]
            out.index_add_(0, group.targets, delta.reshape(-1, out.shape[-1]).index_select(0, group.positions))
            hiddens.append(hidden)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, lora_a, lora_b, scaling, *hiddens)
        ctx.plan = plan
        return result

    @staticmethod
    def backward(ctx, grad_result):
        x, lora_a, lora_b, scaling, *hiddens = ctx.saved_tensors
        needs_x, needs_a, needs_b = ctx.needs_input_grad[1:4]
        grad_out = grad_result.reshape(-1, grad_result.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        grad_x = torch.zeros_like(rows) if needs_x else None
        grad_a = torch.zeros_like(lora_a) if needs_a else None
        grad_b = torch.zeros_like(lora_b) if needs_b else None
        for group, hidden in zip(ctx.plan.groups, hiddens, strict=True):
            grad = torch.where(group.valid, grad_out[group.tokens].to(lora_b.dtype), 0)  # [g, L, out]
            if grad_b is not None:
                grad_b.index_add_(0, group.slots, torch.bmm(grad.transpose(1, 2), hidden.to(lora_b.dtype)))
            grad_hidden = torch.bmm(grad, lora_b[group.slots]).to(x.dtype) * scaling[group.slots][:, None, None]
            if grad_a is not None:
                xs = torch.where(group.valid, rows[group.tokens], 0)
                grad_a.index_add_(0, group.slots, torch.bmm(grad_hidden.transpose(1, 2), xs))
            if grad_x is not None:
                grad_xs = torch.bmm(grad_hidden, lora_a[group.slots])  # [g, L, in]
                grad_x.index_add_(0, group.targets, grad_xs.reshape(-1, rows.shape[-1]).index_select(0, group.positions))
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_result, grad_x, grad_a, grad_b, None, None
