"""Personal-adapter training throughput on one GPU: the off-the-shelf recipes against batched users.

A random-initialised Llama-2-7B-shaped model in bf16 (random weights cost the same compute as
trained ones), LoRA rank 8 on q_proj/v_proj, synthetic users whose history sizes follow a
LaMP-like long tail. Every configuration trains the same users on the same samples for the same
epochs (no time budget: each trains all of them; the tokens each trained are counted by its own
loop and must all be equal, else its figure is withdrawn), and each figure is the median of
``--repeats`` timed runs (3) after one warm-up, with their spread. Configurations (issue 18's in
capitals of meaning; the JSON's ``tokens_per_s`` / ``final_loss`` keys):

  reference_loop     the reference recipe: a fresh PEFT model per user on fp32-upcast weights,
                     bf16 autocast, gradient checkpointing, batches of 16 padded to the longest
  sequential         a fresh PEFT model per user, bf16, length-grouped rows, SDPA
  sequential_liger   the best off-the-shelf per-user recipe: a fresh PEFT model per user, each
                     step's samples packed end to end (varlen flash attention), liger-kernel's
                     RMSNorm / SwiGLU / RoPE
  packed_peft_liger  plain PEFT, ONE LoRA over all users' samples pooled, shuffled and packed into
                     rows of max_length tokens (best-fit), 4 rows a step flattened into one varlen
                     pass (TRL's packing with padding-free batches), liger
  batched            oppu.training.batched: many users' LoRAs in one pass (multi-LoRA slots),
                     samples packed into passes of --tokens-per-forward tokens, varlen attention
  batched_liger      batched with liger
  batched_fp8        batched_liger over an FP8 base (users.base_precision=fp8: the frozen base's
                     GEMMs through torch._scaled_mm, oppu.models.fp8); batched_fp8_tensor: the
                     per-tensor recipe (fp8-tensor)
  qlora              batched (+ liger) over a bitsandbytes 4-bit base (must come last: the bf16
                     model is released)
batched_padded and batched_liger_padded are batched and batched_liger with the per-token LoRA through
padded batched matmuls (oppu.models.span_lora.SpanLora) instead of torch's grouped GEMM, which the
trainer takes where it is native (OPPU_GROUPED_LORA=0 for the run).
Also: sequential_packed and packed_peft (the two anchors without liger: they run on a CPU),
batched_grouped (one sample per row, rows length-grouped: the trainer before packing),
reference_default_sdpa (the reference with PyTorch's default SDPA choice, cuDNN on an H100),
varlen_check (the packed attention against per-sample SDPA) and profile (torch.profiler over two
global steps of 8 users).
liger-kernel patches the model in place and is never undone, so the configurations run in three
phases whatever the order given: those without liger, then those with it (batched_fp8 and profile
take it where it is usable), then qlora. A configuration that needs liger or CUDA where there is
none is reported as skipped, with the reason.
A batched name may end in @TOKENS to set tokens per forward pass for it (batched_liger@12288), or
@TOKENSxUSERS to set the active users too (batched@32768x50).
--shape smollm2-135m --lora all-r16 measures the real-model table's personal training (SmolLM2-135M's
shape, r=16 on all seven projections) instead of the 7B default.
MFU counts the useful work of frozen-base LoRA training (forward 2N + input gradient 2N per token,
the LM head on trained tokens, causal attention) against both the H100 SXM's dense bf16 spec peak
(989 TFLOP/s) and the bf16 GEMM rate measured at the start of the same run (an 8192^3 product);
batched_fp8's is the same bf16-equivalent count.

Launch on the GPU machine (device tool), issue 18's figures:
  source .gpu/activate; python3 bench/train_users.py --out $OUT --users 16 --mean-tokens 8000 --epochs 1
CPU smoke test at toy size (the liger and CUDA configurations reported as skipped):
  python bench/train_users.py --tiny --out /tmp/bench-tiny
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import gc
import gzip
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oppu.models.span_lora import grouped_mm_available  # noqa: E402
from oppu.run_config import OptimSettings  # noqa: E402
from oppu.training.batched import fixed_plan_attention, step_plan, train_users_batched  # noqa: E402
from oppu.training.packing import IGNORE_INDEX, Row, collate, collate_packed, group_by_length, pack_rows  # noqa: E402
from oppu.training.personal import user_seed  # noqa: E402

H100_SXM_BF16_DENSE_FLOPS = 989e12  # NVIDIA's H100 SXM datasheet: dense BF16 tensor core peak
TOKENS_PER_USER = 60_000  # the issue's yardstick for users per GPU-hour
# The configurations of issue 18's table: the JSON's tokens_per_s / final_loss have one entry each.
ISSUE_CONFIGS = ("reference_loop", "sequential", "sequential_liger", "packed_peft_liger", "batched",
                 "batched_liger", "batched_fp8", "qlora")
TINY_EXTRA = ("sequential_packed", "packed_peft")  # the anchors' loops without liger: a CPU runs them
NEEDS_LIGER = {"sequential_liger", "packed_peft_liger", "batched_liger", "batched_liger_padded"}
TAKES_LIGER = {"batched_fp8", "batched_fp8_tensor", "profile"}  # run with liger where it is usable
FP8_CONFIGS = {"batched_fp8": "fp8", "batched_fp8_tensor": "fp8-tensor"}
POOLED_ROWS_PER_STEP = 4  # packed_peft: rows of max_length tokens per optimiser step (4 x 2,048)
ALIASES = {"reference": "reference_loop"}


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
    """One timed run of one configuration."""

    name: str
    users: int = 0
    input_tokens: int = 0  # real (non-padding) tokens of the users' plans (FLOPs are counted from them)
    target_tokens: int = 0
    attention_token_pairs: int = 0  # sum of len^2 over processed samples (attention FLOPs)
    tokens_trained: int = 0  # real tokens the loop itself put through forward+backward
    seconds: float = 0.0
    peak_memory_gib: float = 0.0
    final_losses: dict = field(default_factory=dict)  # user (or "pooled") -> mean loss of its last step
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_trained / self.seconds if self.seconds else 0.0

    def count_plan(self, users, epochs: int) -> None:
        """The work the users' plans hold: every sample of every user, ``epochs`` times."""
        for _, samples in users:
            work = sample_work(samples, epochs)
            self.input_tokens += work[0]
            self.target_tokens += work[1]
            self.attention_token_pairs += work[2]


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


# ---------------------------------------------------------------- model, FLOPs and peaks


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


def measure_gemm_peaks(device: torch.device) -> dict:
    """The GEMM rates of this device, measured now: a square product in the model's dtype (bf16,
    8192^3, on a GPU; float32 on a CPU), ``gemm_flops``, and the same in FP8 (per-tensor e4m3,
    ``oppu.models.fp8.scaled_mm``), ``fp8_flops``, where the device runs it."""
    from oppu.models import fp8

    size, repeats = (8192, 20) if device.type == "cuda" else (512, 3)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)

    def rate(product) -> float:
        for _ in range(3):
            product()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            product()
        sync(device)
        return 2 * size ** 3 * repeats / (time.perf_counter() - start)

    peaks = {"shape": f"{size}x{size}x{size}", "dtype": str(dtype).replace("torch.", ""),
             "gemm_flops": rate(lambda: a @ b)}
    try:
        fp8.check_fp8_device(device, allow_cpu=True)
        qa, sa = fp8.quantize(a, fp8.E4M3, False)
        qb, sb = fp8.quantize(b, fp8.E4M3, False)
        peaks["fp8_flops"] = rate(lambda: fp8.scaled_mm(qa, sa, qb, sb, dtype))
    except Exception as error:  # noqa: BLE001 (no FP8 here: the bf16 peak is the one MFU needs)
        peaks["fp8_flops"] = None
        peaks["fp8_error"] = f"{type(error).__name__}: {error}"
    return peaks


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


# ---------------------------------------------------------------- the loops


def run_batched(name, model, users, hparams, epochs, device, args, warm_up: bool,
                tokens_per_forward: int | None = None, packed: bool = True,
                max_active_users: int | None = None, padded_lora: bool = False) -> Measured:
    if padded_lora:  # the trainer reads it as each pass's plan is built
        with env_set("OPPU_GROUPED_LORA", "0"):
            m = run_batched(name, model, users, hparams, epochs, device, args, warm_up, tokens_per_forward,
                            packed, max_active_users)
        return m
    m = Measured(name)
    tokens_per_forward = tokens_per_forward or args.tokens_per_forward
    active = max_active_users or args.max_active_users

    def done(user_id, state, stats):
        m.users += 1
        m.tokens_trained += stats.input_tokens
        m.final_losses[user_id] = stats.final_loss

    if warm_up:
        # One global step of a full set of active users, so kernel selection (and the FP8
        # quantization's compilation) and the allocator's growth to full-width passes are not timed.
        release_cached_memory(device)
        warmup = [(f"warmup-{user_id}", samples[:hparams.batch_size]) for user_id, samples in users[:active]]
        train_users_batched(model, None, warmup, lora_config(), hparams, seed=0, epochs=1,
                            max_active_users=active, tokens_per_forward=tokens_per_forward, packed=packed)
    with measure(m, device):
        train_users_batched(model, None, users, lora_config(), hparams, seed=0, epochs=epochs,
                            max_active_users=active, tokens_per_forward=tokens_per_forward,
                            packed=packed, on_user_done=done)
    m.count_plan(users, epochs)
    m.extra = {"max_active_users": active, "tokens_per_forward": tokens_per_forward, "packed": packed,
               "lora_kernel": "grouped GEMM" if grouped_mm_available(device) else "padded batched matmuls"}
    return m


@contextlib.contextmanager
def env_set(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _peft_steps(peft_model, steps, hparams, step_losses):
    """Optimiser steps with torch AdamW and HF's warmup-and-linear-decay schedule. ``steps`` yields,
    per optimiser step, an iterable of (scaled loss, tokens) micro-batches; each step's summed loss
    (detached, no sync) goes to ``step_losses``; returns the tokens trained."""
    from transformers import get_linear_schedule_with_warmup

    steps = list(steps)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(hparams.warmup_ratio * len(steps)), len(steps))
    tokens = 0
    for micro_batches in steps:
        step_loss = 0.0
        for loss, micro_tokens in micro_batches():
            loss.backward()
            step_loss = step_loss + loss.detach()
            tokens += micro_tokens
        torch.nn.utils.clip_grad_norm_(params, hparams.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(step_loss)
    return tokens


def _grouped_micro_batches(peft_model, step_samples, tokens_per_forward, device):
    """Length-grouped rows of one user's step, right-padded, no mask (SDPA's causal kernel)."""
    rows = [Row(0, i, s["input_ids"], s["labels"]) for i, s in enumerate(step_samples)]
    n_targets = max(1, sum(r.target_tokens for r in rows))
    for batch in group_by_length(rows, tokens_per_forward, width_multiple=64):
        tensors = collate(batch, 0, device)
        loss = peft_model(input_ids=tensors["input_ids"], labels=tensors["labels"]).loss
        yield loss * (sum(r.target_tokens for r in batch.rows) / n_targets), batch.real_tokens


def _packed_micro_batches(peft_model, step_samples, tokens_per_forward, device):
    """One step's samples laid end to end in passes of at most ``tokens_per_forward`` tokens,
    attention within each sample (``oppu.training.varlen``, inside ``packed_attention``); the
    LM head on trained positions only; the loss the mean over the step's target tokens."""
    from oppu.training.varlen import packed_forward_kwargs

    rows = [Row(0, i, s["input_ids"], s["labels"]) for i, s in enumerate(step_samples)]
    n_targets = max(1, sum(r.target_tokens for r in rows))
    base = peft_model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    for batch in pack_rows(rows, tokens_per_forward, 64):
        tensors = collate_packed(batch, 0, device)
        hidden = decoder(**packed_forward_kwargs(tensors)).last_hidden_state
        predicting = hidden.reshape(-1, hidden.shape[-1]).index_select(0, tensors["trained_positions"])
        logits = head(predicting).float()
        loss = torch.nn.functional.cross_entropy(logits, tensors["trained_labels"], reduction="sum")
        yield loss / n_targets, batch.real_tokens


def _reference_micro_batches(peft_model, step_samples, device):
    """The whole step as one batch padded to its longest sample, attention mask, bf16 autocast."""
    from oppu.models.samples import collate as pad_collate

    batch = {k: v.to(device) for k, v in pad_collate(step_samples, 0).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        yield peft_model(**batch).loss, sum(len(s["input_ids"]) for s in step_samples)


PACKED_LOOPS = ("sequential_packed", "sequential_liger", "packed_peft", "packed_peft_liger")


@contextlib.contextmanager
def _attention_for(name: str, model):
    """The attention every loop but ``reference_default_sdpa`` runs: SDPA without cuDNN (which
    re-plans per shape), and for the packed loops the varlen kernels (checked to be used)."""
    from oppu.training.varlen import packed_attention, packed_attention_calls

    with contextlib.ExitStack() as stack:
        if name != "reference_default_sdpa":
            stack.enter_context(fixed_plan_attention())
        if name in PACKED_LOOPS:
            stack.enter_context(packed_attention(model))
        calls = packed_attention_calls()
        yield
        if name in PACKED_LOOPS and packed_attention_calls() == calls:
            raise RuntimeError(f"{name}: the model's attention did not go through the packed varlen "
                               "function, so packed samples would have attended to each other")


def run_per_user(name, model, users, hparams, epochs, device, args, warm_up: bool) -> Measured:
    """One fresh PEFT model per user, users one after another, every user trained in full.

    ``sequential``: bf16 weights, length-grouped padded rows. ``sequential_packed`` /
    ``sequential_liger``: each step's samples packed end to end with varlen attention (liger
    patched in by the caller). ``reference_loop``: the weights upcast to fp32 (bf16 autocast),
    gradient checkpointing, padded batches.
    """
    import peft

    reference = name.startswith("reference")
    packed = name in ("sequential_packed", "sequential_liger")
    if reference:
        model.float()

    def train_one(user_id, samples, m: Measured | None):
        peft_model = peft.get_peft_model(model, lora_config())
        if reference:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def micro_batches(step):
            step_samples = [samples[i] for i in step]
            if reference:
                return lambda: _reference_micro_batches(peft_model, step_samples, device)
            if packed:
                return lambda: _packed_micro_batches(peft_model, step_samples, args.tokens_per_forward, device)
            return lambda: _grouped_micro_batches(peft_model, step_samples, args.tokens_per_forward, device)

        plan = step_plan(len(samples), hparams.batch_size, epochs,
                         torch.Generator().manual_seed(user_seed(1, user_id)))
        peft_model.train()
        losses: list = []
        tokens = _peft_steps(peft_model, (micro_batches(step) for step in plan), hparams, losses)
        if m is not None:
            m.tokens_trained += tokens
            m.final_losses[user_id] = float(losses[-1])  # one read per user (waits for its last step)
            if reference:
                padded = sum(len(step) * max(len(samples[i]["input_ids"]) for i in step) for step in plan)
                m.extra["padded_tokens"] = m.extra.get("padded_tokens", 0) + padded
        if reference:
            peft_model.gradient_checkpointing_disable()
        peft_model.base_model.unload()

    m = Measured(name)
    with _attention_for(name, model):
        if warm_up:
            release_cached_memory(device)
            train_one("warmup", users[0][1][:hparams.batch_size], None)
        with measure(m, device):
            for user_id, samples in users:
                train_one(user_id, samples, m)
                m.users += 1
    m.count_plan(users, epochs)
    if reference:
        model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        m.extra["real_token_share"] = round(m.input_tokens / m.extra["padded_tokens"], 3)
    return m


def pooled_steps(users, epochs: int, row_tokens: int, rows_per_step: int, seed: int) -> list[list[Row]]:
    """Every user's samples pooled, per epoch shuffled and packed best-fit into rows of at most
    ``row_tokens`` tokens (TRL's packing), the rows shuffled and taken ``rows_per_step`` at a
    time: each step's samples, as one flattened pass."""
    rng = random.Random(seed)
    pool = [Row(0, i, s["input_ids"], s["labels"]) for i, s in enumerate(s for _, samples in users for s in samples)]
    steps = []
    for _ in range(epochs):
        order = pool[:]
        rng.shuffle(order)
        rows = [list(batch.rows) for batch in pack_rows(order, row_tokens)]
        rng.shuffle(rows)
        steps.extend([row for chunk in rows[first:first + rows_per_step] for row in chunk]
                     for first in range(0, len(rows), rows_per_step))
    return steps


def run_packed_peft(name, model, users, hparams, epochs, device, args, warm_up: bool) -> Measured:
    """Plain PEFT: one LoRA trained on all users' samples pooled (``pooled_steps``), each step one
    packed varlen pass of up to 4 x max_length tokens; torch AdamW, HF's schedule."""
    import peft

    steps = pooled_steps(users, epochs, hparams.max_length, POOLED_ROWS_PER_STEP, seed=1)
    budget = POOLED_ROWS_PER_STEP * hparams.max_length

    def train(plan, m: Measured | None):
        peft_model = peft.get_peft_model(model, lora_config())
        peft_model.train()
        losses: list = []

        def micro_batches(rows):
            samples = [{"input_ids": row.input_ids, "labels": row.labels} for row in rows]
            return lambda: _packed_micro_batches(peft_model, samples, budget, device)

        tokens = _peft_steps(peft_model, (micro_batches(rows) for rows in plan), hparams, losses)
        if m is not None:
            m.tokens_trained += tokens
            m.final_losses["pooled"] = float(losses[-1])
        peft_model.base_model.unload()

    m = Measured(name)
    with _attention_for(name, model):
        if warm_up:
            release_cached_memory(device)
            train(steps[:2], None)
        with measure(m, device):
            train(steps, m)
    m.users = len(users)
    m.count_plan(users, epochs)
    m.extra = {"steps": len(steps), "rows_per_step": POOLED_ROWS_PER_STEP, "row_tokens": hparams.max_length}
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


# ---------------------------------------------------------------- one configuration, repeated


def config_phase(name: str) -> int:
    """0: checks; 1: without liger; 2: with liger (it is never undone); 3: qlora (releases the model)."""
    kind = name.partition("@")[0]
    if kind == "varlen_check":
        return 0
    if kind == "qlora":
        return 3
    return 2 if kind in NEEDS_LIGER or kind in TAKES_LIGER else 1


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run here (None: it can)."""
    kind = name.partition("@")[0]
    if kind in NEEDS_LIGER:
        return liger_unusable(device)
    if kind == "qlora" and device.type != "cuda":
        return "skipped: the 4-bit base (bitsandbytes NF4) needs a CUDA GPU"
    return None


def liger_unusable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "skipped: liger-kernel's Triton kernels need a CUDA GPU"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"skipped: liger-kernel cannot be imported ({type(error).__name__}: {error})"
    return None


def apply_liger(model) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


def run_repeats(name: str, run_once, repeats: int, deadline, expected_tokens: int) -> tuple[list[Measured], dict]:
    """``run_once(warm_up)`` ``repeats`` times (warm-up before the first); stops early past the
    deadline. A run that trained other than ``expected_tokens`` tokens withdraws the figure."""
    runs: list[Measured] = []
    notes: dict = {}
    for index in range(repeats):
        if index and deadline():
            notes["incomplete"] = f"{index} of {repeats} repeats: past --deadline-s"
            break
        m = run_once(index == 0)
        print(f"[bench]   {name} run {index + 1}/{repeats}: {m.tokens_per_s:,.0f} tokens/s, {m.seconds:.1f}s, "
              f"{m.tokens_trained:,} tokens, {m.users} users", flush=True)
        runs.append(m)
        if m.tokens_trained != expected_tokens:
            notes["error"] = (f"trained {m.tokens_trained} tokens, not the {expected_tokens} of every user's "
                              "plan: not the same work as the others, figure withdrawn")
            break
    return runs, notes


def summarise(runs: list[Measured], shape: Shape, peaks: dict) -> dict:
    """A configuration's figure: the median run's tokens/s, the spread, MFU against both peaks."""
    rates = [m.tokens_per_s for m in runs]
    median_rate = statistics.median(rates)
    first = runs[0]
    seconds = first.tokens_trained / median_rate if median_rate else float("nan")
    flops = training_flops(first, shape)
    run_losses = [statistics.fmean(m.final_losses.values()) for m in runs if m.final_losses]
    extra = {k: v for k, v in first.extra.items() if not k.startswith("_")}
    return {"users": first.users, "tokens_trained": first.tokens_trained, "input_tokens": first.input_tokens,
            "target_tokens": first.target_tokens, "repeats": len(runs),
            "tokens_per_s": round(median_rate, 1), "runs_tokens_per_s": [round(r, 1) for r in rates],
            "spread": {"min": round(min(rates), 1), "max": round(max(rates), 1),
                       "relative": round((max(rates) - min(rates)) / median_rate, 4) if median_rate else None},
            "seconds_median": round(seconds, 2),
            "users_per_gpu_hour": round(median_rate * 3600 / TOKENS_PER_USER, 1),
            "peak_memory_gib": round(max(m.peak_memory_gib for m in runs), 2),
            "final_loss": round(statistics.median(run_losses), 5) if run_losses else None,
            "final_loss_runs": [round(x, 5) for x in run_losses],
            "mfu_spec_peak": round(flops / seconds / H100_SXM_BF16_DENSE_FLOPS, 4),
            "mfu_measured_peak": round(flops / seconds / peaks["gemm_flops"], 4),
            "mfu_6n_convention_spec_peak": round(6 * decoder_linear_params(shape) * first.input_tokens / seconds
                                                 / H100_SXM_BF16_DENSE_FLOPS, 4),
            **extra}


def speedups(tokens_per_s: dict) -> list[dict]:
    """Ratios of tokens/s, each naming its two configurations (``config`` over ``over``)."""
    measured = {name: rate for name, rate in tokens_per_s.items() if rate}
    batched = [name for name in measured if name.startswith("batched")]
    best = max(batched, key=measured.get) if batched else None
    pairs = [(best, "sequential_liger"), (best, "packed_peft_liger"), (best, "reference_loop"),
             (best, "sequential"), ("batched_fp8", "batched_liger"), ("batched_liger", "batched"),
             ("batched", "reference_loop"), ("batched", "sequential"), ("sequential_liger", "sequential"),
             ("sequential", "reference_loop"), ("qlora", "batched_liger")]
    out, seen = [], set()
    for config, over in pairs:
        if config in measured and over in measured and config != over and (config, over) not in seen:
            seen.add((config, over))
            out.append({"config": config, "over": over, "ratio": round(measured[config] / measured[over], 3),
                        **({"note": "config is the fastest batched configuration"} if config == best else {})})
    return out


def issue_goals(results: dict) -> list[dict]:
    """Issue 18's goals, each with the figure of this run it is judged by (None: not measured)."""
    rates = {name: rate for name, rate in results["tokens_per_s"].items() if rate and name != "qlora"}
    best = max((n for n in rates if n.startswith("batched")), key=rates.get, default=None)
    ratios = {(item["config"], item["over"]): item["ratio"] for item in results["speedups"]}
    fp8 = results.get("fp8_final_loss_vs_bf16", {}).get("relative_difference")
    rows = [(f"tokens/s of the best configuration ({best})", rates.get(best), ">= 26000",
             lambda v: v >= 26_000),
            (f"{best} / sequential_liger", ratios.get((best, "sequential_liger")), ">= 2.5", lambda v: v >= 2.5),
            (f"{best} / packed_peft_liger", ratios.get((best, "packed_peft_liger")), ">= 1.5", lambda v: v >= 1.5),
            ("final loss, batched_fp8 vs batched_liger (relative)", fp8, "within 1%", lambda v: abs(v) <= 0.01),
            (f"users per GPU-hour at {TOKENS_PER_USER:,} tokens each ({best})",
             round(rates[best] * 3600 / TOKENS_PER_USER, 1) if best else None, ">= 1500", lambda v: v >= 1500)]
    return [{"figure": figure, "value": value, "goal": goal, "met": None if value is None else bool(test(value))}
            for figure, value, goal, test in rows]


def write_results(results: dict, out_dir: Path | None, also: str | None) -> None:
    """The headline keys from the configurations measured so far, written out (after every one)."""
    figures = {name: fig for name, fig in results["configs"].items() if "tokens_per_s" in fig}
    names = list(ISSUE_CONFIGS) + [n for n in figures if n not in ISSUE_CONFIGS]
    results["tokens_per_s"] = {n: figures[n]["tokens_per_s"] if n in figures else None for n in names}
    results["final_loss"] = {n: figures[n]["final_loss"] if n in figures else None for n in names}
    results["spread"] = {n: {**figures[n]["spread"], "runs": figures[n]["runs_tokens_per_s"]} for n in figures}
    results["mfu_spec_peak"] = {n: figures[n]["mfu_spec_peak"] for n in figures}
    results["mfu_measured_peak"] = {n: figures[n]["mfu_measured_peak"] for n in figures}
    results["tokens_trained"] = {n: figures[n]["tokens_trained"] for n in figures}
    results["same_tokens"] = all(t == results["expected_tokens"] for t in results["tokens_trained"].values())
    results["not_measured"] = {n: fig.get("error") for n, fig in results["configs"].items() if n not in figures}
    results["speedups"] = speedups(results["tokens_per_s"])
    fp8_loss, bf16_loss = results["final_loss"].get("batched_fp8"), results["final_loss"].get("batched_liger")
    if fp8_loss and bf16_loss:
        results["fp8_final_loss_vs_bf16"] = {"config": "batched_fp8", "over": "batched_liger",
                                             "relative_difference": round((fp8_loss - bf16_loss) / bf16_loss, 5)}
    results["goals"] = issue_goals(results)
    text = json.dumps(results, indent=2)
    if out_dir:
        (out_dir / "train_users.json").write_text(text)
    if also:
        Path(also).write_text(text)


def print_table(results: dict) -> None:
    figures = results["configs"]
    print(f"{'config':<20}{'tokens/s':>10}{'spread':>8}{'users/h':>9}{'peak GiB':>10}{'MFU spec':>9}"
          f"{'MFU meas':>9}{'loss':>9}")
    for name, fig in figures.items():
        if "tokens_per_s" in fig:
            loss = f"{fig['final_loss']:.4f}" if fig["final_loss"] is not None else "-"
            print(f"{name:<20}{fig['tokens_per_s']:>10.0f}{fig['spread']['relative']:>8.1%}"
                  f"{fig['users_per_gpu_hour']:>9.0f}{fig['peak_memory_gib']:>10.1f}{fig['mfu_spec_peak']:>9.1%}"
                  f"{fig['mfu_measured_peak']:>9.1%}{loss:>9}")
        elif "error" in fig:
            print(f"{name:<20} {fig['error']}")
    for item in results.get("speedups", []):
        print(f"  {item['config']} / {item['over']} = {item['ratio']:.2f}x")
    print(f"same tokens in every configuration: {results.get('same_tokens')} ({results['expected_tokens']:,})")
    for goal in results.get("goals", []):
        print(f"  goal {goal['figure']}: {goal['value']} ({goal['goal']}): "
              f"{'met' if goal['met'] else 'not met' if goal['met'] is False else 'not measured'}")


def package_version(distribution: str) -> str | None:
    """An installed distribution's version, as its metadata records it (None: not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy model on CPU (smoke test)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="model shape (random weights)")
    parser.add_argument("--lora", choices=sorted(LORA_SETTINGS), default="qv-r8", help="LoRA rank and targets")
    parser.add_argument("--configs", default=None,
                        help=f"comma list (default: {','.join(ISSUE_CONFIGS)}; with --tiny also "
                             f"{','.join(TINY_EXTRA)}); see the module docstring")
    parser.add_argument("--users", type=int, default=16, help="synthetic users (every configuration trains all)")
    parser.add_argument("--mean-tokens", type=int, default=8_000, help="mean history tokens per user (one epoch)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the figure: median)")
    parser.add_argument("--max-active-users", type=int, default=8)
    parser.add_argument("--tokens-per-forward", type=int, default=8192)
    parser.add_argument("--scratch", default="/tmp/oppu-bench", help="disk for the QLoRA model round trip")
    parser.add_argument("--out", default=None, help="directory for results JSON and profile table")
    parser.add_argument("--results", default=None, help="also write the results JSON here")
    parser.add_argument("--deadline-s", type=float, default=1e9,
                        help="start no run after this many seconds (a configuration cut short says so)")
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
        args.users, args.mean_tokens, args.tokens_per_forward = 6, 600, 512
    default = ISSUE_CONFIGS + (TINY_EXTRA if args.tiny else ())
    requested = [ALIASES.get(c.strip(), c.strip()) for c in (args.configs or ",".join(default)).split(",") if c.strip()]
    configs = sorted(dict.fromkeys(requested), key=config_phase)  # stable: the given order within a phase
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    hparams = OptimSettings(max_length=shape.max_length)
    users = synthetic_users(args.users, args.mean_tokens, shape, seed=1)
    expected = sum(sample_work(samples, args.epochs)[0] for _, samples in users)
    model = build_model(shape, device, dtype)
    peaks = measure_gemm_peaks(device)
    release_cached_memory(device)  # the peak's operands
    print(f"[bench] GEMM peaks: {json.dumps(peaks)}", flush=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "command": "python3 " + " ".join(sys.argv),
        "model": f"random-init {args.shape} shape (bf16)" if not args.tiny else "tiny Llama (fp32, CPU)",
        "lora": f"{LORA_SETTINGS[LORA]} dropout=0.05; AdamW lr 1e-4 wd 0.01 clip 0.3, warmup 10%",
        "users": {"n": len(users), "epochs": args.epochs,
                  "history_tokens": sorted(sum(len(s["input_ids"]) for s in samples) for _, samples in users)},
        "expected_tokens": expected,
        "repeats": args.repeats,
        "peaks": {"spec_bf16_dense_flops": H100_SXM_BF16_DENSE_FLOPS, "spec": "H100 SXM dense BF16 (datasheet)",
                  "measured": peaks},
        "flops_convention": "useful work = 4*N_decoder_linear*tokens + 4*d*V*target_tokens + 6*layers*d*sum(len^2); "
                            "mfu_spec_peak = work / median time / 989e12; mfu_measured_peak = work / median time / "
                            "the bf16 GEMM rate measured in this run (peaks.measured.gemm_flops); batched_fp8's "
                            "work is counted the same (bf16-equivalent)",
        "final_loss_convention": "per user, the mean loss of its last optimiser step, averaged over users "
                                 "(packed_peft*: the pooled LoRA's last step), median over the repeats",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{name: package_version(name) for name in
                        ("transformers", "peft", "liger-kernel", "triton", "bitsandbytes", "accelerate")},
                     "torch_varlen_attn": _has_module("torch.nn.attention.varlen")},
        "configs": {},
    }
    liger_applied = False
    deadline = lambda: time.perf_counter() - started > args.deadline_s  # noqa: E731
    print(f"[bench] {time.perf_counter() - started:.0f}s model built; configs in order: {configs}", flush=True)
    for name in configs:
        if deadline():
            results["configs"][name] = {"error": "skipped: past --deadline-s"}
            continue
        reason = skip_reason(name, device)
        if reason:
            results["configs"][name] = {"error": reason}
            print(f"[bench] {name}: {reason}", flush=True)
            continue
        print(f"[bench] {time.perf_counter() - started:.0f}s {name} ...", flush=True)
        config_started = time.perf_counter()
        kind, _, sizes = name.partition("@")
        tokens, _, active = sizes.partition("x")
        tokens_per_forward = int(tokens) if tokens else None
        max_active_users = int(active) if active else None
        fp8_layers: list[str] = []
        try:
            if (kind in NEEDS_LIGER or kind in TAKES_LIGER) and not liger_applied and not liger_unusable(device):
                apply_liger(model)
                liger_applied = True
            notes: dict = {}
            if kind in ("reference_loop", "reference_default_sdpa", "sequential", "sequential_packed",
                        "sequential_liger"):
                once = functools.partial(run_per_user, name, model, users, hparams, args.epochs, device, args)
            elif kind in ("packed_peft", "packed_peft_liger"):
                once = functools.partial(run_packed_peft, name, model, users, hparams, args.epochs, device, args)
            elif kind in ("batched", "batched_grouped", "batched_liger", "batched_padded", "batched_liger_padded",
                          *FP8_CONFIGS):
                if kind in FP8_CONFIGS:
                    from oppu.models.fp8 import set_base_precision

                    quantizing = time.perf_counter()
                    fp8_layers = set_base_precision(model, FP8_CONFIGS[kind], allow_cpu=device.type == "cpu")
                    sync(device)
                    notes["fp8"] = {"base_precision": FP8_CONFIGS[kind], "layers": len(fp8_layers),
                                    "weights_quantized_s": round(time.perf_counter() - quantizing, 2),
                                    **({"device": "CPU: torch's reference _scaled_mm (numerics only)"}
                                       if device.type == "cpu" else {})}
                once = functools.partial(run_batched, name, model, users, hparams, args.epochs, device, args,
                                         tokens_per_forward=tokens_per_forward, packed=kind != "batched_grouped",
                                         max_active_users=max_active_users, padded_lora=kind.endswith("_padded"))
            elif kind == "varlen_check":
                results["varlen_check"] = check_varlen(device)
                print(f"[bench] varlen_check: {json.dumps(results['varlen_check'])}", flush=True)
                continue
            elif kind == "profile":
                results["profile"] = profile_batched(model, users, hparams, device, args, out_dir)
                summary = {k: v for k, v in results["profile"].items() if k != "top_kernels_us"}
                print(f"[bench] profile: {json.dumps(summary)}", flush=True)
                continue
            elif kind == "qlora":  # last: the bf16 model is released to measure the 4-bit one alone
                from oppu.models.quantization import load_base_4bit

                path = save_for_qlora(model, args)
                model = None
                release_cached_memory(device)
                quantized = load_base_4bit(str(path))
                notes["base_weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
                once = functools.partial(run_batched, "qlora", quantized, users, hparams, args.epochs, device, args)
            else:
                raise SystemExit(f"unknown config {name!r}")
            runs, run_notes = run_repeats(name, once, args.repeats, deadline, expected)
            if fp8_layers:
                from oppu.models.fp8 import quantize_mode, restore_base_linears

                notes["fp8"]["activation_quantize"] = quantize_mode() if device.type == "cuda" else "eager"
                restore_base_linears(model)
        except Exception as error:  # one failed configuration must not lose the others' figures
            results["configs"][name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[bench] {name} failed: {error!r}", flush=True)
            if fp8_layers and model is not None:
                from oppu.models.fp8 import restore_base_linears

                restore_base_linears(model)
            write_results(results, out_dir, args.results)
            continue
        figure = summarise(runs, shape, peaks) if "error" not in run_notes else {}
        # liger patches the Llama classes too, so the 4-bit model loaded after it has it as well
        results["configs"][name] = {**figure, **notes, **run_notes, "liger": liger_applied,
                                    "wall_s_with_warm_up": round(time.perf_counter() - config_started, 1)}
        print(f"[bench] {name}: {json.dumps(results['configs'][name])}", flush=True)
        write_results(results, out_dir, args.results)
    write_results(results, out_dir, args.results)
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
