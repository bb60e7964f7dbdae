"""Personal-adapter training throughput on one GPU: reference loop vs sequential vs batched users.

A random-initialised Llama-2-7B-shaped model in bf16 (random weights cost the same compute as
trained ones), LoRA rank 8 on q_proj/v_proj, synthetic users whose history sizes follow a
LaMP-like long tail. Configurations, in this order (one process, one GPU):

  sequential  one PEFT model per user, bf16, length-grouped rows, SDPA, no checkpointing
  batched     oppu.training.batched: many users' LoRAs in one pass (multi-LoRA slots), samples
              packed end to end into passes of --tokens-per-forward tokens, varlen attention
  batched_grouped  the same trainer with one sample per row, rows length-grouped and padded
              (packed=False: the trainer before packing)
  reference   the reference recipe: fresh PEFT model per user on fp32-upcast weights, bf16
              autocast, gradient checkpointing, batches of 16 padded to the longest
  reference_default_sdpa  reference with PyTorch's default SDPA backend choice (cuDNN on H100)
  batched_liger  batched, with liger-kernel's RMSNorm / SwiGLU / RoPE (patched in place: every
              later configuration runs with them too)
  profile     torch.profiler over two global steps of 8 users (the model as patched so far)
  qlora       batched over a bitsandbytes 4-bit base (oppu.models.quantization); must come last
A batched name may end in @TOKENS to set tokens per forward pass for it (batched_liger@12288), or
@TOKENSxUSERS to set the active users too (batched@32768x50).
--shape smollm2-135m --lora all-r16 measures the real-model table's personal training (SmolLM2-135M's
shape, r=16 on all seven projections) instead of the 7B default.
Every loop runs SDPA without the cuDNN backend (it re-plans per shape), except
reference_default_sdpa.

Launch on the GPU machine (device tool):
  source .gpu/activate; python3 bench/train_users.py --out $OUT
CPU smoke test at toy size:
  python bench/train_users.py --tiny
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import gzip
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oppu.run_config import OptimSettings  # noqa: E402
from oppu.training.batched import fixed_plan_attention, step_plan, train_users_batched  # noqa: E402
from oppu.training.packing import IGNORE_INDEX, Row, collate, group_by_length  # noqa: E402
from oppu.training.personal import user_seed  # noqa: E402

H100_BF16_FLOPS = 790e12
TOKENS_PER_USER = 60_000  # the yardstick for users per GPU-hour
ALL_CONFIGS = ("reference", "sequential", "batched", "batched_liger", "profile")


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_length: int
    kv_heads: int | None = None  # grouped-query attention; None: as many as heads
    tie_embeddings: bool = False

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads or self.heads,
                           intermediate_size=self.intermediate, vocab_size=self.vocab,
                           tie_word_embeddings=self.tie_embeddings,
                           max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           attn_implementation="sdpa", use_cache=False)

    @property
    def kv_width(self) -> int:
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)


LLAMA2_7B = Shape(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000, max_length=2048)
# SmolLM2-135M-Instruct's shape (the real model of oppu/configs/table1-real.yaml), at the table's
# max_length of 512: random weights cost the same compute as the real ones.
SMOLLM2_135M = Shape(hidden=576, layers=30, heads=9, intermediate=1536, vocab=49152, max_length=512,
                     kv_heads=3, tie_embeddings=True)
TINY = Shape(hidden=64, layers=2, heads=4, intermediate=128, vocab=256, max_length=128)
SHAPES = {"llama2-7b": LLAMA2_7B, "smollm2-135m": SMOLLM2_135M}
# LoRA settings: the 7B bench's r=8 on q/v, and the real-model table's r=16 on all seven projections.
LORA_SETTINGS = {
    "qv-r8": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r16": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]),
}


@dataclass
class Measured:
    """One configuration's run."""

    name: str
    users: int = 0
    input_tokens: int = 0  # real (non-padding) tokens through forward+backward
    target_tokens: int = 0
    attention_token_pairs: int = 0  # sum of len^2 over processed samples (attention FLOPs)
    seconds: float = 0.0
    peak_memory_gib: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.input_tokens / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- synthetic users


def synthetic_users(n_users: int, mean_tokens: int, shape: Shape, seed: int) -> list[tuple[str, list[dict]]]:
    """Users with long-tailed history sizes; samples of log-normal length, most with a short trained target.

    About 60% of samples are supervised (prompt masked, a 4-48 token target), the rest history
    text learnt whole, as LaMP's tasks mix the two.
    """
    rng = random.Random(seed)
    median_length = max(16, shape.max_length // 8)
    users = []
    for index in range(n_users):
        budget = int(mean_tokens * rng.lognormvariate(0, 0.9) / math.exp(0.9 ** 2 / 2))
        samples, total = [], 0
        while total < max(budget, median_length):
            length = int(min(shape.max_length, max(16, rng.lognormvariate(math.log(median_length), 0.7))))
            ids = [1] + [rng.randrange(3, shape.vocab) for _ in range(length - 1)]
            if rng.random() < 0.6:
                target = min(length - 1, rng.randint(4, 48))
                labels = [IGNORE_INDEX] * (length - target) + ids[length - target:]
            else:
                labels = [IGNORE_INDEX] + ids[1:]
            samples.append({"input_ids": ids, "labels": labels})
            total += length
        users.append((f"user-{index:04d}", samples))
    return users


def sample_work(samples: list[dict], epochs: int) -> tuple[int, int, int]:
    """(input tokens, target tokens, sum of squared lengths) of ``epochs`` passes over ``samples``."""
    tokens = sum(len(s["input_ids"]) for s in samples)
    targets = sum(Row(0, 0, s["input_ids"], s["labels"]).target_tokens for s in samples)
    pairs = sum(len(s["input_ids"]) ** 2 for s in samples)
    return epochs * tokens, epochs * targets, epochs * pairs


# ---------------------------------------------------------------- model and FLOPs


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(shape.llama_config()).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    print(f"[bench] model on {next(model.parameters()).device}, {next(model.parameters()).dtype}", flush=True)
    return model


def decoder_linear_params(shape: Shape) -> int:
    per_layer = (2 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.kv_width
                 + 3 * shape.hidden * shape.intermediate)
    return shape.layers * per_layer


def training_flops(m: Measured, shape: Shape) -> float:
    """FLOPs frozen-base LoRA training needs: forward (2N) + input-gradient backward (2N) per token,
    the LM head on trained tokens, and causal attention (2*L^2*d forward, twice that backward, per layer).
    The frozen base needs no weight gradients, so 4N (not 6N) is the useful work per token."""
    dense = 4 * decoder_linear_params(shape) * m.input_tokens
    head = 4 * shape.hidden * shape.vocab * m.target_tokens
    attention = 6 * shape.layers * shape.hidden * m.attention_token_pairs
    return dense + head + attention


LORA = "qv-r8"  # set from --lora in main()


def lora_config(dropout: float = 0.05):
    from peft import LoraConfig

    return LoraConfig(**LORA_SETTINGS[LORA], lora_dropout=dropout, bias="none")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release_cached_memory(device: torch.device) -> None:
    """Give the previous configuration's cached GPU blocks back, before this one warms up.

    Not inside ``measure``: that would throw away what the warm-up grew, and the timed run would
    pay the allocator's cudaMalloc calls (and their device syncs) again, which a process
    training thousands of users pays once.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def measure(m: Measured, device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    m.seconds = time.perf_counter() - start
    if device.type == "cuda":
        m.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30


# ---------------------------------------------------------------- the three loops


def run_batched(name, model, users, hparams, epochs, device, args, tokens_per_forward: int | None = None,
                packed: bool = True, max_active_users: int | None = None) -> Measured:
    m = Measured(name)
    tokens_per_forward = tokens_per_forward or args.tokens_per_forward
    args = argparse.Namespace(**{**vars(args), "max_active_users": max_active_users or args.max_active_users})

    def done(user_id, state, stats):
        m.users += 1
        print(f"[bench]   {name}: {user_id} done ({stats.steps} steps), {m.users}/{len(users)}", flush=True)

    # Warm-up: one global step of a full set of active users, so kernel selection and the
    # allocator's growth to full-width passes are not timed.
    release_cached_memory(device)
    warmup = [(f"warmup-{user_id}", samples[:hparams.batch_size])
              for user_id, samples in users[:args.max_active_users]]
    train_users_batched(model, None, warmup, lora_config(), hparams, seed=0, epochs=1,
                        max_active_users=args.max_active_users, tokens_per_forward=tokens_per_forward,
                        packed=packed)
    with measure(m, device):
        train_users_batched(model, None, users, lora_config(), hparams, seed=0, epochs=epochs,
                            max_active_users=args.max_active_users, tokens_per_forward=tokens_per_forward,
                            packed=packed, on_user_done=done)
    for _, samples in users:
        work = sample_work(samples, epochs)
        m.input_tokens += work[0]
        m.target_tokens += work[1]
        m.attention_token_pairs += work[2]
    m.extra = {"max_active_users": args.max_active_users, "tokens_per_forward": tokens_per_forward,
               "packed": packed}
    return m


def _peft_user_loop(peft_model, samples, hparams, epochs, device, seed, user_id, micro_batches):
    """One user's optimiser steps with torch AdamW and HF's schedule; ``micro_batches(step)`` yields batches."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    plan = step_plan(len(samples), hparams.batch_size, epochs,
                     torch.Generator().manual_seed(user_seed(seed + 1, user_id)))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(hparams.warmup_ratio * len(plan)), len(plan))
    for step in plan:
        for loss in micro_batches([samples[i] for i in step]):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hparams.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _sequential_micro_batches(peft_model, step_samples, tokens_per_forward, device):
    """Length-grouped rows of one user's step, right-padded, no mask (SDPA's causal kernel)."""
    rows = [Row(0, i, s["input_ids"], s["labels"]) for i, s in enumerate(step_samples)]
    n_targets = max(1, sum(r.target_tokens for r in rows))
    for batch in group_by_length(rows, tokens_per_forward, width_multiple=64):
        tensors = collate(batch, 0, device)
        loss = peft_model(input_ids=tensors["input_ids"], labels=tensors["labels"]).loss
        yield loss * (sum(r.target_tokens for r in batch.rows) / n_targets)


def _reference_micro_batches(peft_model, step_samples, device):
    """The whole step as one batch padded to its longest sample, attention mask, bf16 autocast."""
    from oppu.models.samples import collate as pad_collate

    batch = {k: v.to(device) for k, v in pad_collate(step_samples, 0).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        yield peft_model(**batch).loss


def run_per_user(name, model, users, hparams, epochs, device, args) -> Measured:
    """One PEFT model per user, users one after another, until ``args.budget_s`` has passed.

    ``sequential``: bf16 weights, length-grouped rows, no checkpointing. ``reference``: the
    weights upcast to fp32 (bf16 autocast), gradient checkpointing, padded batches.
    """
    import peft

    reference = name.startswith("reference")
    # Every loop runs SDPA on the same fixed backends; ``reference_default_sdpa`` keeps PyTorch's
    # default choice (cuDNN on an H100, which re-plans per shape) to show what that costs.
    fixed_attention = name != "reference_default_sdpa"
    if reference:
        model.float()

    def train_one(user_id, samples):
        peft_model = peft.get_peft_model(model, lora_config())
        if reference:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            batches = lambda step: _reference_micro_batches(peft_model, step, device)  # noqa: E731
        else:
            batches = lambda step: _sequential_micro_batches(peft_model, step, args.tokens_per_forward,  # noqa: E731
                                                             device)
        peft_model.train()
        _peft_user_loop(peft_model, samples, hparams, epochs, device, 0, user_id, batches)
        if reference:
            peft_model.gradient_checkpointing_disable()
        peft_model.base_model.unload()

    release_cached_memory(device)
    with fixed_plan_attention() if fixed_attention else contextlib.nullcontext():
        train_one("warmup", users[0][1][:hparams.batch_size])
    m = Measured(name)
    attention = fixed_plan_attention() if fixed_attention else contextlib.nullcontext()
    with measure(m, device), attention:
        start = time.perf_counter()
        for user_id, samples in users:
            train_one(user_id, samples)
            print(f"[bench]   {name}: {user_id} done at {time.perf_counter() - start:.1f}s", flush=True)
            m.users += 1
            work = sample_work(samples, epochs)
            m.input_tokens += work[0]
            m.target_tokens += work[1]
            m.attention_token_pairs += work[2]
            if reference:
                plan = step_plan(len(samples), hparams.batch_size, epochs,
                                 torch.Generator().manual_seed(user_seed(1, user_id)))
                padded = sum(len(step) * max(len(samples[i]["input_ids"]) for i in step) for step in plan)
                m.extra["padded_tokens"] = m.extra.get("padded_tokens", 0) + padded
            sync(device)
            if time.perf_counter() - start > args.budget_s:
                break
    if reference:
        model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        m.extra["real_token_share"] = round(m.input_tokens / m.extra["padded_tokens"], 3)
    return m


# ---------------------------------------------------------------- checks and profile


def check_varlen(device: torch.device) -> dict:
    """The packed attention on this device against SDPA sample by sample: forward and gradients."""
    from oppu.training.varlen import flash_varlen_usable, varlen_causal_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    lengths = [700, 1, 129, 2048, 64, 300]
    total = sum(lengths)
    inputs = [torch.randn(total, 32, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    grad = torch.randn(total, 32, 128, device=device, dtype=dtype)
    out = varlen_causal_attention(*inputs, cu, max(lengths))
    got = [out, *torch.autograd.grad(out, inputs, grad)]
    expected = [torch.empty_like(t) for t in got]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = (t.detach()[start:end].transpose(0, 1).float().requires_grad_() for t in inputs)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(o, (q, k, v), grad[start:end].transpose(0, 1).float())
        for slot, value in zip(expected, (o, *grads), strict=True):
            slot[start:end] = value.detach().transpose(0, 1).to(dtype)
    errors = {name: float((g.float() - e.float()).norm() / e.float().norm())
              for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True)}
    return {"flash_varlen": flash_varlen_usable(inputs[0]), "relative_error": errors,
            "ok": all(err < 2e-2 for err in errors.values())}



def profile_batched(model, users, hparams, device, args, out_dir: Path | None) -> dict:
    """torch.profiler over a few global steps; GPU time by kernel family and how busy the GPU was."""
    from torch.profiler import ProfilerActivity, profile

    subset = [(uid, samples[:2 * hparams.batch_size]) for uid, samples in users[:args.max_active_users]]
    real_tokens = sum(len(s["input_ids"]) for _, samples in subset for s in samples)

    def train():
        train_users_batched(model, None, subset, lora_config(), hparams, seed=0, epochs=1,
                            max_active_users=args.max_active_users, tokens_per_forward=args.tokens_per_forward)
        sync(device)

    train()  # the same work unprofiled: its wall time, and nothing first-time in the profile
    start = time.perf_counter()
    train()
    unprofiled_s = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        train()
    wall_s = time.perf_counter() - start
    timeline = {}
    if out_dir:
        trace = out_dir / "trace_batched.json"
        prof.export_chrome_trace(str(trace))
        timeline = idle_gaps(json.loads(trace.read_text()))
        with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        trace.unlink()
    families = {"gemm (base + LM head)": 0.0, "flash attention": 0.0, "lora bmm/gather": 0.0,
                "norm / activation / rope (elementwise)": 0.0, "optimizer + copies": 0.0, "other": 0.0}
    kernels = []
    averages = prof.key_averages()
    for event in averages:
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA or event.key.startswith("oppu/"):
            continue  # the trainer's record_function spans show up as device events too
        kernels.append((event.key, device_us))
        key = event.key.lower()
        if "flash" in key or "fmha" in key or "attention" in key:
            family = "flash attention"
        elif "gemv" in key or ("gemm" in key and "batched" in key) or "index" in key or "scatter" in key:
            family = "lora bmm/gather"
        elif any(s in key for s in ("gemm", "cutlass", "xmma", "nvjet", "sm90")):
            family = "gemm (base + LM head)"
        elif any(s in key for s in ("memcpy", "copy", "foreach", "lerp", "addcmul", "sqrt", "div")):
            family = "optimizer + copies"
        elif any(s in key for s in ("elementwise", "reduce", "norm", "silu", "mul", "add", "rms", "swiglu",
                                    "rope", "triton", "cat", "neg")):
            family = "norm / activation / rope (elementwise)"
        else:
            family = "other"
        families[family] += device_us / 1e6
    busy_s = sum(families.values())
    table = averages.table(sort_by="self_device_time_total" if device.type == "cuda"
                                      else "self_cpu_time_total", row_limit=25)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total", row_limit=40)
    if out_dir:
        (out_dir / "profile_batched.txt").write_text(table)
        (out_dir / "profile_by_shape.txt").write_text(by_shape)
    top = sorted(kernels, key=lambda kv: -kv[1])[:12]
    self_cpu_s = sum(event.self_cpu_time_total for event in averages) / 1e6
    return {"real_tokens": real_tokens, "tokens_per_forward": args.tokens_per_forward,
            "unprofiled_wall_s": unprofiled_s,
            "unprofiled_tokens_per_s": real_tokens / unprofiled_s if unprofiled_s else 0.0,
            "wall_s": wall_s, "gpu_busy_s": busy_s, "gpu_busy_share": busy_s / wall_s if wall_s else 0.0,
            "busy_tokens_per_s": real_tokens / busy_s if busy_s else 0.0,
            "unprofiled_busy_share": busy_s / unprofiled_s if unprofiled_s else 0.0,
            "self_cpu_s": self_cpu_s, "by_family_s": families, "top_kernels_us": top, "timeline": timeline}


def idle_gaps(trace: dict, min_gap_us: float = 20.0) -> dict:
    """Where the GPU waited, from a chrome trace: every gap between kernels of at least
    ``min_gap_us``, charged to the CPU op that launched the kernel after the gap (the host was
    still working towards it) and, inside that op, to the innermost op enclosing the launch."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_work = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                         key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_by_thread: dict = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            ops_by_thread.setdefault(e.get("tid"), []).append(e)
    starts = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda e: e["ts"])
        starts[tid] = [op["ts"] for op in ops]
    if not device_work:
        return {}

    def enclosing(launch: dict, lookback: int = 4000) -> list[str]:
        """Names of the launching thread's ops around the launch, outermost first (recent ones only)."""
        ops, ts = ops_by_thread.get(launch.get("tid"), []), launch["ts"]
        end = bisect.bisect_right(starts.get(launch.get("tid"), []), ts)
        return [op["name"] for op in ops[max(0, end - lookback):end] if ts <= op["ts"] + op.get("dur", 0)]

    busy_until, gaps, gap_spans = device_work[0]["ts"] + device_work[0].get("dur", 0), [], []
    for work in device_work[1:]:
        gap = work["ts"] - busy_until
        if gap > 0:
            gap_spans.append((busy_until, gap))
        if gap >= min_gap_us:
            launch = launches.get(work.get("args", {}).get("correlation"))
            stack = enclosing(launch) if launch else []
            gaps.append((gap, work["name"][:80], stack if len(stack) <= 4 else stack[:2] + stack[-2:]))
        busy_until = max(busy_until, work["ts"] + work.get("dur", 0))
    span = busy_until - device_work[0]["ts"]
    # What the trainer's main thread was doing while the GPU waited: its innermost oppu/ span.
    phases = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("oppu/")),
                    key=lambda e: e["ts"])
    phase_starts = [e["ts"] for e in phases]
    by_phase: dict[str, float] = {}
    for start, gap in gap_spans:
        middle = start + gap / 2
        end = bisect.bisect_right(phase_starts, middle)
        inside = [e["name"] for e in phases[max(0, end - 200):end] if middle <= e["ts"] + e.get("dur", 0)]
        key = inside[-1] if inside else "outside oppu/ spans"
        by_phase[key] = by_phase.get(key, 0.0) + gap
    by_op: dict[str, float] = {}
    for gap, _, stack in gaps:
        key = " > ".join(stack[-2:]) if stack else "?"
        by_op[key] = by_op.get(key, 0.0) + gap
    top_ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    return {"span_s": span / 1e6, "idle_s": sum(g for g, _, _ in gaps) / 1e6, "gaps": len(gaps),
            "min_gap_us": min_gap_us,
            "idle_by_trainer_phase_s": {k: round(v / 1e6, 4) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
            "idle_by_launching_op_s": {k: round(v / 1e6, 4) for k, v in top_ops},
            "largest_gaps": [{"us": round(g), "next_kernel": name, "launched_in": stack}
                             for g, name, stack in sorted(gaps, key=lambda x: -x[0])[:15]]}


# ---------------------------------------------------------------- QLoRA


def save_for_qlora(model, args) -> Path:
    """The bf16 model written out, so the 4-bit loader quantises it as it would a real checkpoint."""
    path = Path(args.scratch) / "random-llama"
    model.save_pretrained(str(path))
    return path


def run_qlora(path: Path, users, hparams, epochs, device, args) -> Measured:
    from oppu.models.quantization import load_base_4bit

    quantized = load_base_4bit(str(path))
    m = run_batched("qlora", quantized, users, hparams, epochs, device, args)
    m.extra["base_weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return m


# ---------------------------------------------------------------- report


def summarise(m: Measured, shape: Shape) -> dict:
    flops = training_flops(m, shape)
    seconds = m.seconds or float("nan")
    extra = {k: v for k, v in m.extra.items() if not k.startswith("_")}
    return {"users": m.users, "input_tokens": m.input_tokens, "target_tokens": m.target_tokens,
            "seconds": round(m.seconds, 2), "tokens_per_s": round(m.tokens_per_s, 1),
            "users_per_gpu_hour": round(m.tokens_per_s * 3600 / TOKENS_PER_USER, 1),
            "peak_memory_gib": round(m.peak_memory_gib, 2),
            "mfu": round(flops / seconds / H100_BF16_FLOPS, 4),
            "mfu_6n_convention": round(6 * decoder_linear_params(shape) * m.input_tokens / seconds
                                       / H100_BF16_FLOPS, 4),
            **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy model on CPU (smoke test)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="model shape (random weights)")
    parser.add_argument("--lora", choices=sorted(LORA_SETTINGS), default="qv-r8", help="LoRA rank and targets")
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS), help=f"comma list of {ALL_CONFIGS} and qlora")
    parser.add_argument("--users", type=int, default=16, help="synthetic users (batched trains all)")
    parser.add_argument("--mean-tokens", type=int, default=15_000, help="mean history tokens per user (one epoch)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-active-users", type=int, default=8)
    parser.add_argument("--tokens-per-forward", type=int, default=8192)
    parser.add_argument("--budget-s", type=float, default=35.0, help="time after which sequential/reference stop")
    parser.add_argument("--scratch", default="/tmp/oppu-bench", help="disk for the QLoRA model round trip")
    parser.add_argument("--out", default=None, help="directory for results JSON and profile table")
    parser.add_argument("--results", default=None, help="also write the results JSON here")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip configs not started by then")
    parser.add_argument("--stack-every-s", type=float, default=0, help="dump Python stacks this often (debug)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.stack_every_s:
        import faulthandler

        faulthandler.dump_traceback_later(args.stack_every_s, repeat=True)

    global LORA
    LORA = args.lora
    shape = TINY if args.tiny else SHAPES[args.shape]
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny:
        args.users, args.mean_tokens, args.tokens_per_forward, args.budget_s = 6, 600, 512, 5.0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    hparams = OptimSettings(max_length=shape.max_length)
    users = synthetic_users(args.users, args.mean_tokens, shape, seed=1)
    model = build_model(shape, device, dtype)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "command": "python3 " + " ".join(sys.argv),
        "model": f"random-init {args.shape} shape (bf16)" if not args.tiny else "tiny Llama (fp32, CPU)",
        "lora": f"{LORA_SETTINGS[LORA]} dropout=0.05; AdamW lr 1e-4 wd 0.01 clip 0.3, warmup 10%",
        "users": {"n": len(users), "epochs": args.epochs,
                  "history_tokens": sorted(sum(len(s["input_ids"]) for s in samples) for _, samples in users)},
        "flops_convention": "mfu: (4*N_decoder_linear*tokens + 4*d*V*target_tokens + 6*layers*d*sum(len^2)) "
                            "/ time / 790e12; mfu_6n_convention: 6*N*tokens / time / 790e12",
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": _version("transformers"), "peft": _version("peft"),
                     "liger_kernel": _version("liger_kernel"),
                     "torch_varlen_attn": _has_module("torch.nn.attention.varlen")},
        "configs": {},
    }
    measured: dict[str, Measured] = {}
    liger_applied = False
    print(f"[bench] {time.perf_counter() - started:.0f}s model built", flush=True)
    for name in configs:
        if time.perf_counter() - started > args.deadline_s:
            results["configs"][name] = {"error": "skipped: past --deadline-s"}
            continue
        print(f"[bench] {time.perf_counter() - started:.0f}s {name} ...", flush=True)
        kind, _, sizes = name.partition("@")
        tokens, _, active = sizes.partition("x")
        tokens_per_forward = int(tokens) if tokens else None
        max_active_users = int(active) if active else None
        try:
            if name in ("sequential", "reference", "reference_default_sdpa"):
                measured[name] = run_per_user(name, model, users, hparams, args.epochs, device, args)
            elif kind in ("batched", "batched_grouped"):
                measured[name] = run_batched(name, model, users, hparams, args.epochs, device, args,
                                             tokens_per_forward, packed=kind == "batched",
                                             max_active_users=max_active_users)
            elif kind == "batched_liger":
                if not liger_applied:
                    from liger_kernel.transformers import apply_liger_kernel_to_llama

                    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                fused_linear_cross_entropy=False, model=model)
                    liger_applied = True
                measured[name] = run_batched(name, model, users, hparams, args.epochs, device, args,
                                             tokens_per_forward, max_active_users=max_active_users)
            elif name == "varlen_check":
                results["varlen_check"] = check_varlen(device)
                print(f"[bench] varlen_check: {json.dumps(results['varlen_check'])}", flush=True)
            elif name == "profile":
                results["profile"] = profile_batched(model, users, hparams, device, args, out_dir)
                summary = {k: v for k, v in results["profile"].items() if k != "top_kernels_us"}
                print(f"[bench] profile: {json.dumps(summary)}", flush=True)
            elif name == "qlora":  # last: the bf16 model is released to measure the 4-bit one alone
                path = save_for_qlora(model, args)
                model = None
                gc.collect()
                torch.cuda.empty_cache()
                measured[name] = run_qlora(path, users, hparams, args.epochs, device, args)
            else:
                raise SystemExit(f"unknown config {name!r}")
        except Exception as error:  # one failed configuration must not lose the others' figures
            results["configs"][name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[bench] {name} failed: {error!r}", flush=True)
            continue
        if name in measured:
            results["configs"][name] = summarise(measured[name], shape)
            print(f"[bench] {name}: {json.dumps(results['configs'][name])}", flush=True)
        write_results(results, out_dir, args.results)
    print_table(results)
    return 0


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except Exception:  # noqa: BLE001 (an absent or broken package is reported as None)
        return None


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def write_results(results: dict, out_dir: Path | None, also: str | None) -> None:
    """Headline figures from the configurations measured so far, written out (after every config)."""
    figures = results["configs"]
    batched_names = [n for n in figures if n.startswith("batched") and "tokens_per_s" in figures[n]]
    best = max(batched_names, key=lambda n: figures[n]["tokens_per_s"]) if batched_names else None
    results["tokens_per_s"] = {"reference_loop": figures.get("reference", {}).get("tokens_per_s"),
                               "sequential": figures.get("sequential", {}).get("tokens_per_s"),
                               "batched": figures[best]["tokens_per_s"] if best else None,
                               "qlora": figures.get("qlora", {}).get("tokens_per_s")}
    results["batched_config"] = best
    results["users_per_gpu_hour"] = {k: figures[n].get("users_per_gpu_hour") for k, n in
                                     (("reference_loop", "reference"), ("sequential", "sequential"),
                                      ("batched", best), ("qlora", "qlora")) if n in figures}
    results["peak_memory_gib"] = {k: figures[n].get("peak_memory_gib") for k, n in
                                  (("reference_loop", "reference"), ("sequential", "sequential"),
                                   ("batched", best), ("qlora", "qlora")) if n in figures}
    results["mfu"] = {k: figures[n].get("mfu") for k, n in
                      (("reference_loop", "reference"), ("sequential", "sequential"), ("batched", best),
                       ("qlora", "qlora")) if n in figures}
    ref, ours = results["tokens_per_s"]["reference_loop"], results["tokens_per_s"]["batched"]
    if ref and ours:
        results["speedup_batched_vs_reference"] = round(ours / ref, 2)
    text = json.dumps(results, indent=2)
    if out_dir:
        (out_dir / "train_users.json").write_text(text)
    if also:
        Path(also).write_text(text)


def print_table(results: dict) -> None:
    figures = results["configs"]
    print(f"{'config':<15}{'tokens/s':>10}{'users/h':>9}{'peak GiB':>10}{'MFU':>7}")
    for name, fig in figures.items():
        if "tokens_per_s" in fig:
            print(f"{name:<15}{fig['tokens_per_s']:>10.0f}{fig['users_per_gpu_hour']:>9.0f}"
                  f"{fig['peak_memory_gib']:>10.1f}{fig['mfu']:>7.1%}")
        else:
            print(f"{name:<15} {fig.get('error')}")


if __name__ == "__main__":
    raise SystemExit(main())
