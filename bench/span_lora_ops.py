"""Host-side operator count of the per-token LoRA (packed batched training): one matmul pair per run (before
runs were batched), runs batched into padded groups (``SpanLora``), and one grouped GEMM per side over all
runs (``grouped_update``, torch's grouped_mm): one LoRA layer (576 -> 576, r=16, SmolLM2-135M's q_proj), a 32k-token pass of 50 users' runs,
forward and backward, counted with torch.profiler on the CPU (each op is a kernel launch on the GPU). Last, the
same runs laid out in place (``collate_packed(..., owner_align=16)``: each user's block padded to a multiple of
16 tokens, so the grouped GEMM reads the pass's tokens where they lie and every slot is a group).

    python3 bench/span_lora_ops.py          # needs the git history: the earlier layer is read from commit 5e439eb
"""
import importlib.util
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from oppu.models.span_lora import GROUP_ALIGN, SpanLora, SpanPlan, grouped_update  # noqa: E402

BEFORE = "5e439eb"  # the last commit with one matmul pair per run (multi_lora._SpanLora)
rng = random.Random(0)
spans, t = [], 0
for u in range(50):
    n = rng.randint(600, 1300)
    spans.append((u, t, t + n))
    t += n
T, din, dout, r = t, 576, 576, 16
in_place_spans, t = [], 0
for slot, start, end in spans:
    n = -(-(end - start) // GROUP_ALIGN) * GROUP_ALIGN
    in_place_spans.append((slot, t, t + n))
    t += n
def load_before():
    source = subprocess.run(["git", "show", f"{BEFORE}:oppu/models/multi_lora.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "multi_lora_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("multi_lora_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


old = load_before()


def run(kind):
    torch.manual_seed(0)
    tokens = t if kind == "in_place" else T
    x = torch.randn(1, tokens, din, requires_grad=True)
    a = torch.randn(50, r, din, requires_grad=True)
    b = torch.randn(50, dout, r, requires_grad=True)
    s = torch.full((50,), 2.0)
    base = torch.randn(1, tokens, dout)
    grad = torch.randn(1, tokens, dout)
    # once per pass for every layer: not counted
    plan = SpanPlan.build(in_place_spans if kind == "in_place" else spans, "cpu", n_slots=50)
    if kind == "in_place":  # the first call checks once whether the grouped GEMM takes empty groups
        grouped_update(base.clone(), x, a, b, s, plan.aligned).backward(grad)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        if kind == "in_place":
            assert plan.aligned.in_place and plan.aligned.slot_offsets is not None
            out = grouped_update(base.clone(), x, a, b, s, plan.aligned)
        elif kind == "old":
            out = old._SpanLora.apply(base.clone(), x, a, b, s, tuple(spans))
        elif kind == "grouped":
            out = grouped_update(base.clone(), x, a, b, s, plan.aligned)
        else:
            out = SpanLora.apply(base.clone(), x, a, b, s, plan)
        out.backward(grad)
    # top-level aten ops: those not called from inside another aten op
    ops = [e for e in p.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(ops), out.detach(), x.grad
n_old, o1, g1 = run("old")
n_new, o2, g2 = run("new")
n_grouped, o3, g3 = run("grouped")
n_in_place, _, _ = run("in_place")
print(f"top-level aten ops per LoRA layer (forward+backward), {len(spans)} users' runs in a {T}-token pass: "
      f"one matmul pair per run {n_old}, runs batched {n_new} ({n_old / n_new:.1f}x fewer), "
      f"grouped GEMM {n_grouped} ({n_new / n_grouped:.1f}x fewer than batched), "
      f"laid out in place {n_in_place} ({n_grouped / n_in_place:.1f}x fewer than grouped, {t - T} padding tokens)")
print(f"largest difference from one pair per run: output {(o1 - o2).abs().max().item():.2e} / "
      f"{(o1 - o3).abs().max().item():.2e}, input gradient {(g1 - g2).abs().max().item():.2e} / "
      f"{(g1 - g3).abs().max().item():.2e} (batched / grouped)")
