"""The grouped-GEMM LoRA on the GPU (pytest -m gpu): on an H100/H200/B200 in bf16, torch's grouped_mm
(CUTLASS) gives the padded groups' output and gradients, and a NaN slot stays in its own tokens.

Tolerance: bf16 products in another summation order, rtol 2e-2 / atol 2e-2 on outputs and
gradients of unit-scale inputs (SmolLM2-135M's q_proj shape, 50 users' runs).
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from oppu.models.span_lora import SpanLora, SpanPlan, grouped_mm_available, grouped_update  # noqa: E402


def _runs(users: int = 50, seed: int = 0):
    rng, spans, start = random.Random(seed), [], 0
    for user in range(users):
        n = rng.randint(5, 700)
        spans.append((user, start, start + n))
        start += n
    return spans, start + 37  # a padding tail in no run


def _inputs(tokens: int, nan_slot: int | None = None):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, tokens, 576, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    a = torch.randn(50, 16, 576, device="cuda", dtype=torch.bfloat16, generator=g) / 24
    b = torch.randn(50, 576, 16, device="cuda", dtype=torch.bfloat16, generator=g) / 4
    if nan_slot is not None:
        a[nan_slot, 0, 0] = float("nan")
    base = torch.randn(1, tokens, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    return x, a.requires_grad_(), b.requires_grad_(), torch.full((50,), 2.0, device="cuda"), base


def test_grouped_gemm_runs_natively_here_and_equals_the_padded_groups():
    if not grouped_mm_available(torch.device("cuda")):
        pytest.skip(f"grouped_mm is not native on compute capability {torch.cuda.get_device_capability()}")
    spans, tokens = _runs()
    plan = SpanPlan.build(spans, "cuda")
    assert plan.aligned is not None
    _grouped_against_padded_groups(plan, tokens)


def _grouped_against_padded_groups(plan, tokens: int) -> list[tuple]:
    """``grouped_update`` and ``SpanLora`` over the same inputs: equal outputs and gradients (bf16
    tolerance); returns (output, x, A and B gradients) of each, the padded groups' first."""
    results = []
    for path in ("spans", "grouped"):
        x, a, b, scaling, base = _inputs(tokens)
        if path == "grouped":
            out = grouped_update(base.clone(), x, a, b, scaling, plan.aligned)
        else:
            out = SpanLora.apply(base.clone(), x, a, b, scaling, plan)
        weights = torch.linspace(-1, 1, out.numel(), device="cuda", dtype=out.dtype).reshape(out.shape)
        (out.float() * weights).sum().backward()
        results.append((out.detach(), x.grad, a.grad, b.grad))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    return results


def test_grouped_gemm_keeps_a_nan_slot_in_its_own_tokens_on_the_gpu():
    if not grouped_mm_available(torch.device("cuda")):
        pytest.skip("grouped_mm is not native here")
    spans, tokens = _runs()
    x, a, b, scaling, base = _inputs(tokens, nan_slot=7)
    out = grouped_update(base.clone(), x, a, b, scaling, SpanPlan.build(spans, "cuda").aligned)
    out.float().sum().backward()
    _, start, end = spans[7]
    bad = torch.isnan(out[0].float()).any(-1).nonzero().squeeze(1).tolist()
    assert bad == list(range(start, end))
    others = [s for s in range(50) if s != 7]
    assert not torch.isnan(a.grad[others].float()).any() and not torch.isnan(b.grad[others].float()).any()


def _in_place_runs(users: int = 50, absent: tuple[int, ...] = (3, 17, 40), seed: int = 1):
    """As ``collate_packed(..., owner_align=16)`` lays a pass: each present user's block padded to 16, from token 0."""
    rng, spans, start = random.Random(seed), [], 0
    for user in range(users):
        if user in absent:
            continue
        n = -(-rng.randint(5, 700) // 16) * 16
        spans.append((user, start, start + n))
        start += n
    return spans, start


def test_runs_laid_out_in_place_equal_the_padded_groups_with_absent_slots_as_empty_groups():
    from oppu.models.span_lora import empty_groups_work

    if not grouped_mm_available(torch.device("cuda")):
        pytest.skip("grouped_mm is not native here")
    spans, tokens = _in_place_runs()
    plan = SpanPlan.build(spans, "cuda", n_slots=50)
    assert plan.aligned.in_place and plan.aligned.slot_offsets is not None
    print(f"empty groups in the grouped GEMM on this GPU: "
          f"{'taken' if empty_groups_work(torch.device('cuda'), torch.bfloat16) else 'refused (slots gathered)'}")
    results = _grouped_against_padded_groups(plan, tokens)
    absent = torch.tensor([3, 17, 40], device="cuda")
    assert torch.count_nonzero(results[1][2][absent]) == 0 and torch.count_nonzero(results[1][3][absent]) == 0
