"""``SpanLora`` batches runs of similar length into one matmul: its output and gradients equal one
pair of matmuls per run, for runs of very different lengths, a slot with several runs, tokens in
no run, and a NaN slot that reaches nothing but its own tokens and gradient."""

from __future__ import annotations

import pytest
import torch

from oppu.models.span_lora import (
    GROUP_ALIGN,
    MAX_PADDING,
    SpanLora,
    SpanPlan,
    grouped_mm_fits,
    grouped_update,
    lora_update,
)

SPANS = [(2, 0, 7), (0, 7, 8), (1, 10, 40), (2, 40, 43), (3, 43, 60), (0, 60, 61), (1, 61, 95)]  # 8, 9: no run


def _inputs(seed: int = 0, nan_slot: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 100, 12, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 3, 12, generator=g, dtype=torch.float64)
    b = torch.randn(4, 10, 3, generator=g, dtype=torch.float64)
    if nan_slot is not None:
        a[nan_slot, 0, 0] = float("nan")
    a.requires_grad_(True)
    b.requires_grad_(True)
    base = torch.randn(1, 100, 10, generator=g, dtype=torch.float64)
    return x, a, b, torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64), base


def _loop(x, a, b, scaling, base):
    out = base.clone().reshape(-1, base.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    pieces = [out]
    for slot, start, end in SPANS:
        update = (rows[start:end] @ a[slot].t() * scaling[slot]) @ b[slot].t()
        pieces.append(torch.nn.functional.pad(update, (0, 0, start, out.shape[0] - end)))
    return torch.stack(pieces).sum(0).reshape(base.shape)


def _grouped(x, a, b, scaling, base):
    return SpanLora.apply(base.clone(), x, a, b, scaling, SpanPlan.build(SPANS, "cpu"))


def test_groups_bound_padding_and_cover_every_run_once():
    plan = SpanPlan.build(SPANS, "cpu")
    assert len(plan.groups) > 1  # lengths from 1 to 34 do not fit one group
    covered = []
    for group in plan.groups:
        lengths = group.valid.squeeze(-1).sum(1)
        assert lengths.max() <= MAX_PADDING * lengths.min()
        covered.extend(group.targets.tolist())
    assert sorted(covered) == [t for _, start, end in SPANS for t in range(start, end)]


def test_output_and_gradients_equal_one_matmul_pair_per_run():
    grads = []
    for fn in (_loop, _grouped):
        x, a, b, scaling, base = _inputs()
        out = fn(x, a, b, scaling, base)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), x.grad, a.grad, b.grad))
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected)
    assert torch.equal(grads[1][0][0, 8:10], _inputs()[4][0, 8:10])  # tokens in no run keep the base output


def test_a_nan_slot_stays_in_its_own_tokens_and_gradient():
    x, a, b, scaling, base = _inputs(nan_slot=3)
    out = _grouped(x, a, b, scaling, base)
    out.sum().backward()
    nan_rows = torch.isnan(out[0]).any(-1).nonzero().squeeze(1).tolist()
    assert nan_rows == list(range(43, 60))  # slot 3's one run
    assert torch.isnan(b.grad[3]).any()  # B's gradient reads slot 3's NaN hidden values
    assert not torch.isnan(a.grad[[0, 1, 2]]).any() and not torch.isnan(b.grad[[0, 1, 2]]).any()
    clean = [t for t in range(100) if not 43 <= t < 60]
    assert not torch.isnan(x.grad[0, clean]).any()


# The grouped-GEMM path (torch's grouped_mm; the CPU runs it natively): float32, shapes whose row
# strides are multiples of 16 bytes, runs of lengths that are not multiples of GROUP_ALIGN; with tokens
# in no run between runs, and (PREFIX_SPANS) as packed training lays them: the pass's first tokens, in order.
ALIGNED_SPANS = [(2, 0, 7), (0, 7, 8), (1, 10, 40), (2, 40, 43), (3, 43, 60), (0, 60, 61), (1, 61, 95)]
PREFIX_SPANS = [(2, 0, 7), (0, 7, 8), (1, 8, 40), (2, 40, 43), (3, 43, 60), (0, 60, 61), (1, 61, 95)]


def _aligned_inputs(nan_slot: int | None = None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 100, 16, generator=g, requires_grad=True)
    a = torch.randn(4, 4, 16, generator=g)
    b = torch.randn(4, 8, 4, generator=g)
    if nan_slot is not None:
        a[nan_slot, 0, 0] = float("nan")
    a.requires_grad_(True)
    b.requires_grad_(True)
    base = torch.randn(1, 100, 8, generator=g)
    return x, a, b, torch.tensor([0.5, 1.0, 2.0, 0.25]), base


def _through(path, x, a, b, scaling, base, spans=ALIGNED_SPANS):
    plan = SpanPlan.build(spans, "cpu", n_slots=a.shape[0])
    if path == "grouped":
        assert plan.aligned is not None and grouped_mm_fits(x, a, b)
        return grouped_update(base.clone(), x, a, b, scaling, plan.aligned)
    return SpanLora.apply(base.clone(), x, a, b, scaling, plan)


@pytest.mark.parametrize("spans", [ALIGNED_SPANS, PREFIX_SPANS], ids=["gaps", "prefix"])
def test_grouped_gemm_path_equals_the_padded_groups_output_and_gradients(spans):
    assert (SpanPlan.build(spans, "cpu").aligned.prefix_tokens == 95) == (spans is PREFIX_SPANS)
    grads = []
    for path in ("spans", "grouped"):
        x, a, b, scaling, base = _aligned_inputs()
        out = _through(path, x, a, b, scaling, base, spans)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), x.grad, a.grad, b.grad))
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    untouched = [8, 9] if spans is ALIGNED_SPANS else list(range(95, 100))  # tokens in no run: the base output
    assert torch.equal(grads[1][0][0, untouched], _aligned_inputs()[4][0, untouched])


def test_grouped_gemm_layout_starts_every_run_aligned_and_covers_each_token_once():
    runs = SpanPlan.build(ALIGNED_SPANS, "cpu").aligned
    ends = runs.offsets.tolist()
    assert all(end % GROUP_ALIGN == 0 for end in ends) and len(ends) == len(ALIGNED_SPANS)
    assert sorted(runs.targets.tolist()) == [t for _, start, end in ALIGNED_SPANS for t in range(start, end)]
    assert runs.slots.tolist() == [slot for slot, _, _ in ALIGNED_SPANS]


@pytest.mark.parametrize("spans", [ALIGNED_SPANS, PREFIX_SPANS], ids=["gaps", "prefix"])
def test_grouped_gemm_path_keeps_a_nan_slot_in_its_own_tokens_and_gradient(spans):
    x, a, b, scaling, base = _aligned_inputs(nan_slot=3)
    out = _through("grouped", x, a, b, scaling, base, spans)
    out.sum().backward()
    assert torch.isnan(out[0]).any(-1).nonzero().squeeze(1).tolist() == list(range(43, 60))
    assert not torch.isnan(a.grad[[0, 1, 2]]).any() and not torch.isnan(b.grad[[0, 1, 2]]).any()
    clean = [t for t in range(100) if not 43 <= t < 60]
    assert not torch.isnan(x.grad[0, clean]).any()


def test_layers_whose_shapes_the_grouped_gemm_refuses_take_the_padded_groups(monkeypatch):
    x, a, b, scaling, base = _inputs()  # float64, rank 3: not a grouped-GEMM dtype or stride
    assert not grouped_mm_fits(x, a, b)
    monkeypatch.setenv("OPPU_GROUPED_LORA", "0")
    assert SpanPlan.build(SPANS, "cpu").aligned is None
    expected = _loop(x, a, b, scaling, base)
    torch.testing.assert_close(lora_update(base.clone(), x, a, b, scaling, SpanPlan.build(SPANS, "cpu")), expected)


def test_a_grouped_gemm_failure_falls_back_for_good_with_one_warning(monkeypatch, caplog):
    from oppu.models import span_lora

    def broken(*args, **kwargs):
        raise RuntimeError("grouped gemm kernels are not built")

    monkeypatch.setattr(span_lora, "_GROUPED_MM_BROKEN", set())
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", broken)
    x, a, b, scaling, base = _aligned_inputs()
    plan = SpanPlan.build(ALIGNED_SPANS, "cpu")
    expected = SpanLora.apply(base.clone(), x, a, b, scaling, plan)
    with caplog.at_level("WARNING", logger="oppu.models.span_lora"):
        torch.testing.assert_close(lora_update(base.clone(), x, a, b, scaling, plan), expected)
        torch.testing.assert_close(lora_update(base.clone(), x, a, b, scaling, plan), expected)
    assert [r.message for r in caplog.records if "grouped GEMM failed" in r.message].__len__() == 1
    assert not grouped_mm_fits(x, a, b)


# Runs laid out in place (``collate_packed(..., owner_align=GROUP_ALIGN)``): contiguous from token 0,
# each a multiple of GROUP_ALIGN long. IN_PLACE_SPANS has one run per slot in slot order, slot 2 absent
# (an empty group, no gathering) and tokens after the last run (the pass's tail); UNORDERED_IN_PLACE
# has slot 1 twice (its matrices gathered per run).
IN_PLACE_SPANS = [(0, 0, 16), (1, 16, 48), (3, 48, 96)]
UNORDERED_IN_PLACE = [(1, 0, 32), (0, 32, 48), (1, 48, 64), (3, 64, 96)]
WHOLE_PASS = [(0, 0, 32), (1, 32, 48), (2, 48, 64), (3, 64, 100 - 100 % GROUP_ALIGN)]


@pytest.mark.parametrize("spans", [IN_PLACE_SPANS, UNORDERED_IN_PLACE, WHOLE_PASS],
                         ids=["slot-order", "unordered", "whole-pass"])
def test_runs_laid_out_in_place_give_the_padded_groups_output_and_gradients(spans, monkeypatch):
    from oppu.models import span_lora

    plan = SpanPlan.build(spans, "cpu", n_slots=4)
    assert plan.aligned.in_place and plan.aligned.layout_tokens == spans[-1][2]
    assert (plan.aligned.slot_offsets is not None) == (spans is not UNORDERED_IN_PLACE)
    gathered = []
    original = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select",
                        lambda self, *args, **kwargs: (gathered.append(1), original(self, *args, **kwargs))[1])
    grads = []
    for path in ("spans", "grouped"):
        x, a, b, scaling, base = _aligned_inputs()
        gathered.clear()
        out = _through(path, x, a, b, scaling, base, spans)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), x.grad, a.grad, b.grad))
    assert bool(gathered) == (spans is UNORDERED_IN_PLACE)  # in slot order, no slot's matrices gathered
    for expected, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tail = list(range(spans[-1][2], 100))
    assert torch.equal(grads[1][0][0, tail], _aligned_inputs()[4][0, tail])  # after the last run: the base output
    if spans is IN_PLACE_SPANS:
        assert torch.count_nonzero(grads[1][2][2]) == 0 and torch.count_nonzero(grads[1][3][2]) == 0
    assert span_lora.empty_groups_work(torch.device("cpu"), torch.float32)


def test_runs_laid_out_in_place_keep_a_nan_slot_in_its_own_tokens_and_gradient():
    x, a, b, scaling, base = _aligned_inputs(nan_slot=1)
    out = _through("grouped", x, a, b, scaling, base, IN_PLACE_SPANS)
    out.sum().backward()
    assert torch.isnan(out[0]).any(-1).nonzero().squeeze(1).tolist() == list(range(16, 48))
    assert not torch.isnan(a.grad[[0, 2, 3]]).any() and not torch.isnan(b.grad[[0, 2, 3]]).any()
    clean = [t for t in range(100) if not 16 <= t < 48]
    assert not torch.isnan(x.grad[0, clean]).any()


def test_runs_not_in_place_take_the_layout():
    for spans in ([(0, 0, 16), (1, 16, 40)], [(0, 0, 16), (1, 32, 48)], [(0, 16, 32)]):  # 24 long; a gap; not from 0
        assert not SpanPlan.build(spans, "cpu", n_slots=2).aligned.in_place
