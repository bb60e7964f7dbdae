"""Micro-benchmark: one decode step's per-row LoRA over 64 adapted 4096x4096 layers, CUDA-graphed.

Each variant computes ``y = x @ W.T + scaling[s_b] * B[s_b] @ (A[s_b] @ x_b)`` for a batch of
one-token rows, compiled with ``torch.compile`` and replayed 64 layers deep in one CUDA graph;
printed: microseconds per layer and the overhead over the bare ``x @ W.T``. Used to choose
``oppu.serving.lora``'s decode path (python bench/serve_lora_step.py --out lora.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oppu.serving.lora import lora_delta_one_token  # noqa: E402

LAYERS, HIDDEN, SLOTS, RANK = 64, 4096, 64, 8


def base(x, w, a, b, bt, aw, s, slots):
    return x @ w.t()


def gather_bmm(x, w, a, b, bt, aw, s, slots):  # MultiLoraLinear's forward
    g = slots.clamp(min=0)
    h = torch.bmm(x[:, None, :], a[g].transpose(1, 2))
    d = torch.bmm(h, b[g].transpose(1, 2))[:, 0] * torch.where(slots >= 0, s[g], 0.0).to(x.dtype)[:, None]
    return x @ w.t() + d


def mulsum(x, w, a, b, bt, aw, s, slots):
    return x @ w.t() + lora_delta_one_token(x, a, b, s, slots)


def mulsum_native(x, w, a, b, bt, aw, s, slots):
    g = slots.clamp(min=0)
    h = (x[:, None, :] * a[g]).sum(-1)
    d = (h[:, None, :] * b[g]).sum(-1)
    return x @ w.t() + d * torch.where(slots >= 0, s[g], 0.0).to(x.dtype)[:, None]


def _mask(h, s, slots):
    owned = slots[:, None] == torch.arange(SLOTS, device=slots.device)
    weights = torch.where(owned, s, 0.0).to(h.dtype)
    return (h.view(-1, SLOTS, RANK) * weights[:, :, None]).view(-1, SLOTS * RANK)


def all_slots(x, w, a, b, bt, aw, s, slots):  # every slot's A in one GEMM, masked, every slot's B^T in one addmm
    h = x @ a.view(SLOTS * RANK, HIDDEN).t()
    return torch.addmm(x @ w.t(), _mask(h, s, slots), bt.t())


def w_ext(x, w, a, b, bt, aw, s, slots):  # A stacked under W: the base GEMM also gives every slot's A x
    full = x @ aw.t()
    return torch.addmm(full[:, :HIDDEN], _mask(full[:, HIDDEN:], s, slots), bt.t())


VARIANTS = {f.__name__: f for f in (base, gather_bmm, mulsum, mulsum_native, all_slots, w_ext)}


def measure(fn, batch: int, layers) -> tuple[float, dict]:
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(fn, dynamic=False)
    x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
    slots = torch.randint(-1, SLOTS, (batch,), device="cuda")
    _, code = run_and_get_code(compiled, x, *layers[0], slots)
    code = "\n".join(code)
    info = {"extern": sorted({line.split("extern_kernels.")[1].split("(")[0]
                              for line in code.splitlines() if "extern_kernels." in line and "(" in line}),
            "triton_kernels": code.count("async_compile.triton(")}
    expected = gather_bmm(x, *layers[0], slots)
    got = compiled(x, *layers[0], slots)
    info["max_abs_err_vs_gather_bmm"] = float((got.float() - expected.float()).abs().max())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for weights in layers[:3]:
            compiled(x, *weights, slots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weights in layers:
            y = compiled(x, *weights, slots)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    del y
    return 1000 * start.elapsed_time(end) / 20 / len(layers), info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        w = torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
        a = torch.randn(SLOTS, RANK, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
        b = torch.randn(SLOTS, HIDDEN, RANK, device="cuda", dtype=torch.bfloat16) * 0.02
        bt = b.transpose(0, 1).reshape(HIDDEN, SLOTS * RANK).contiguous()
        aw = torch.cat([w, a.view(SLOTS * RANK, HIDDEN)])
        layers.append((w, a, b, bt, aw, torch.rand(SLOTS, device="cuda") + 0.5))
    results = {}
    for batch in (32, 1):
        for name in args.variants.split(","):
            try:
                us, info = measure(VARIANTS[name], batch, layers)
            except Exception as exc:  # one variant failing must not cost the others
                print(f"batch {batch:2d} {name:14s} failed: {exc!r}"[:2000], flush=True)
                continue
            results[f"{name}@{batch}"] = {"us_per_layer": us, **info}
            print(f"batch {batch:2d} {name:14s} {us:7.2f} us/layer  {info}", flush=True)
    for key, row in results.items():
        name, batch = key.split("@")
        row["overhead_us_per_layer"] = row["us_per_layer"] - results[f"base@{batch}"]["us_per_layer"]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'variant':22s} {'us/layer':>9s} {'LoRA us/layer':>14s}")
    for key, row in results.items():
        print(f"{key:22s} {row['us_per_layer']:9.2f} {row['overhead_us_per_layer']:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
