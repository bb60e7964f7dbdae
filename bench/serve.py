"""Serving benchmark: the serve app's engine with 1,000 distinct rank-8 adapters against the base alone.

On the GPU (a random-initialised Llama-2-7B-shaped model in bf16; no weights are downloaded):

    python bench/serve.py --mode gpu --out results-gpu.json

then, on a CPU machine, the cold load of the same adapters from S3 (moto's server on 127.0.0.1),
merged with the GPU figures into the committed file:

    python bench/serve.py --mode s3 --merge results-gpu.json --out bench/results/serve.json

The host tier holds ``host_cache_adapters`` (256) of the 1,000 adapters, as a replica's does: the Zipf
mix's host-cache hit rate is counted, not assumed; a cold mix (users uniform over every adapter, a fresh
host tier) is timed with its loads from the store; and the first batch of every phase, and of a batch
shape not seen before, is reported on its own (``*_first_batch_s``: compile and CUDA-graph capture),
besides the warm batches the throughput figures average.

``--tiny`` runs either mode at toy size (a CPU smoke test of this script). The engine is
``oppu.serving.engine.GenerationEngine`` and the host tier ``oppu.serving.adapters.AdapterCache``,
the same code the replicas run; requests skip HTTP so the figures are the engine's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oppu.serving.adapters import AdapterCache, AdapterShape, decode_adapter  # noqa: E402
from oppu.serving.engine import GenerationEngine, GenerationRow, LoraSlotsConfig  # noqa: E402
from oppu.store import AdapterKey, AdapterStore  # noqa: E402

TASK, VARIANT, FINGERPRINT = "LaMP-2M", "oppu", "bench7bshape0000"
TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class BenchShape:
    """Model, adapter and workload sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    n_adapters: int
    rank: int
    gpu_slots: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    zipf_batches: int
    host_cache_adapters: int  # the host tier, as a replica's host_cache_adapters (smaller than n_adapters)


FULL = BenchShape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, n_adapters=1000, rank=8,
                  gpu_slots=64, batch=32, prompt_tokens=32, new_tokens=128, zipf_batches=8, host_cache_adapters=256)
TINY = BenchShape(hidden=64, intermediate=128, layers=2, heads=4, vocab=512, n_adapters=40, rank=8,
                  gpu_slots=8, batch=4, prompt_tokens=8, new_tokens=8, zipf_batches=3, host_cache_adapters=16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("gpu", "s3"), required=True)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test of this script")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--merge", help="(s3 mode) the GPU run's JSON to merge the S3 figure into")
    parser.add_argument("--s3-adapters", type=int, default=20, help="(s3 mode) adapters to cold-load")
    parser.add_argument("--profile-dir", help="(gpu mode) also profile the first decode steps of a base and an "
                                              "adapter batch; kernel tables go here")
    args = parser.parse_args()
    shape = TINY if args.tiny else FULL
    results = run_gpu(shape, args.profile_dir) if args.mode == "gpu" else run_s3(shape, args.s3_adapters)
    if args.merge:
        results = json.loads(Path(args.merge).read_text()) | results
    results["command"] = " && ".join(filter(None, [results.get("command"), "python " + " ".join(sys.argv)]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def run_gpu(shape: BenchShape, profile_dir: str | None = None) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    graphs = device == "cuda"
    model = random_llama(shape, device)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # no EOS: every row decodes its budget
    model.generation_config.eos_token_id = None
    prompts = random_prompts(shape, shape.batch, seed=1)
    out: dict = {"device": torch.cuda.get_device_name() if graphs else "cpu", "n_adapters": shape.n_adapters,
                 "shape": shape.__dict__, "cuda_graphs": graphs, "torch_compile": graphs}

    base = GenerationEngine(model, tokenizer, None, cuda_graphs=graphs, compile_step=graphs, static_cache=True)
    base_b1 = timed_batches(base, [[GenerationRow(prompts[0], None, shape.new_tokens)]] * 3)
    progress("base batch 1", base_b1)
    base_b32 = timed_batches(base, [[GenerationRow(p, None, shape.new_tokens) for p in prompts]] * 3)
    progress(f"base batch {shape.batch}", base_b32)
    out["batch1_ms_per_token_base"] = base_b1.ms_per_token
    # The first batch of a new (batch, cache length) shape compiles and captures its decode step.
    out["base_batch1_first_batch_s"], out["base_batch1_warm_batch_s"] = base_b1.first_batch_s, base_b1.batch_s
    out[f"base_batch{shape.batch}_first_batch_s"] = base_b32.first_batch_s
    out[f"base_batch{shape.batch}_warm_batch_s"] = base_b32.batch_s
    out["base_tokens_per_s"] = base_b32.tokens_per_s
    out["base_ttft_ms_p50"] = base_b32.ttft_ms_p50
    out["base_per_token_ms_p50"] = base_b32.step_ms_p50
    out["base_decode_tokens_per_s"] = base_b32.decode_tokens_per_s
    if profile_dir:
        profile_batch(base, [GenerationRow(p, None, shape.new_tokens) for p in prompts], Path(profile_dir) / "base")
    del base
    torch.cuda.empty_cache() if graphs else None

    with tempfile.TemporaryDirectory(prefix="oppu-bench-store-") as store_dir:
        store = AdapterStore(store_dir)
        started = time.perf_counter()
        publish_random_adapters(store, shape, range(shape.n_adapters), device)
        out["publish_s"] = time.perf_counter() - started
        started = time.perf_counter()
        engine = GenerationEngine(model, tokenizer, LoraSlotsConfig(shape.gpu_slots, shape.rank, TARGETS),
                                  cuda_graphs=graphs, compile_step=graphs, static_cache=True,
                                  host_adapters=shape.host_cache_adapters)  # as a replica
        out["engine_start_s"] = time.perf_counter() - started  # incl. pinning the host tier's buffers
        # As a replica does: each adapter is packed into one pinned slot-format buffer as it enters the host
        # tier, which holds fewer adapters than the store (host_cache_adapters < n_adapters).
        host = HostCounts()
        cache = AdapterCache(store, task=TASK, variant=VARIANT, shape=AdapterShape(FINGERPRINT, shape.rank, TARGETS),
                             capacity=shape.host_cache_adapters, check_ttl_s=3600.0, prepare=engine.prepare_adapter,
                             recorder=host)
        out["host_cache_adapters"] = shape.host_cache_adapters
        cold_ms = cold_loads(cache, [user_id(i) for i in range(shape.n_adapters)])
        out["cold_load_ms_local_p50"] = statistics.median(cold_ms)
        out["cold_load_ms_local_p99"] = percentile(cold_ms, 99)
        out["cold_load_includes"] = "store read + sha256 + header check + pack into one slot-format buffer (pinned on CUDA)"
        out.update(slot_load_times(engine, store, cache, shape))

        one = asyncio.run(cache.get(user_id(0)))
        progress(f"cold loads p50 {out['cold_load_ms_local_p50']:.1f} ms", None)
        adapter_b1 = timed_batches(engine, [[GenerationRow(prompts[0], one, shape.new_tokens)]] * 3)
        progress("adapter batch 1", adapter_b1)
        out["batch1_ms_per_token_adapter"] = adapter_b1.ms_per_token

        # Requests from a Zipf-like mix of all users: the popular few stay resident in the GPU slots.
        users = zipf_users(shape.n_adapters, shape.batch * (shape.zipf_batches + 1), seed=2)
        host_before = (host.hits, host.misses)
        batches = []
        for b in range(shape.zipf_batches + 1):
            chosen = users[b * shape.batch:(b + 1) * shape.batch]
            loaded = [asyncio.run(cache.get(user_id(u))) for u in chosen]
            batches.append([GenerationRow(p, a, shape.new_tokens) for p, a in zip(prompts, loaded, strict=True)])
        slot_stats_before = (engine.slots.stats.hits, engine.slots.stats.misses, engine.slots.stats.load_seconds)
        mixed = timed_batches(engine, batches)
        progress(f"zipf mix batch {shape.batch}", mixed)
        hits = engine.slots.stats.hits - slot_stats_before[0]
        misses = engine.slots.stats.misses - slot_stats_before[1]
        out["adapters_tokens_per_s"] = mixed.tokens_per_s
        out["adapters_vs_base_throughput"] = mixed.tokens_per_s / out["base_tokens_per_s"]
        out["batch1_adapter_vs_base_latency"] = out["batch1_ms_per_token_adapter"] / out["batch1_ms_per_token_base"]
        out["ttft_ms_p50"], out["ttft_ms_p99"] = mixed.ttft_ms_p50, mixed.ttft_ms_p99
        out["per_token_ms_p50"], out["per_token_ms_p99"] = mixed.step_ms_p50, mixed.step_ms_p99
        out["distinct_users_in_mix"] = len(set(users))
        out["adapters_decode_tokens_per_s"] = mixed.decode_tokens_per_s
        out["adapters_vs_base_decode_only"] = mixed.decode_tokens_per_s / out["base_decode_tokens_per_s"]
        out["gpu_slot_hit_rate"] = hits / max(1, hits + misses)
        out["gpu_slot_misses_per_batch"] = misses / shape.zipf_batches
        # Host time per slot load in the mix (the copies themselves are queued on the GPU stream).
        load_s = engine.slots.stats.load_seconds - slot_stats_before[2]
        out["gpu_slot_load_ms_host_mean"] = 1000 * load_s / max(1, misses)
        # Measured on the Zipf mix's lookups (the host tier holds the last host_cache_adapters of the cold loads).
        zipf_hits, zipf_misses = host.hits - host_before[0], host.misses - host_before[1]
        out["host_cache_hit_rate_zipf"] = zipf_hits / max(1, zipf_hits + zipf_misses)
        out["adapters_first_batch_s"], out["adapters_warm_batch_s"] = mixed.first_batch_s, mixed.batch_s
        out.update(cold_uniform_mix(engine, store, shape, prompts))
        progress(f"cold uniform mix: {out['cold_uniform_tokens_per_s']:.0f} tokens/s incl. loads", None)
        out.update(new_shape_cost(engine, cache, shape))
        progress(f"new shape: first batch {out['new_shape_first_batch_s']:.2f} s, "
                 f"warm {out['new_shape_warm_batch_s']:.2f} s", None)
        if profile_dir:
            profile_batch(engine, batches[1], Path(profile_dir) / "adapters")
    return out


def run_s3(shape: BenchShape, n_adapters: int) -> dict:
    """Cold loads of 7B-shaped rank-8 adapters from a local S3 server (moto) through the store."""
    import logging
    import os

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        store = AdapterStore("s3://bench/adapters")
        publish_random_adapters(store, shape, range(n_adapters), "cpu")
        cache = AdapterCache(store, task=TASK, variant=VARIANT, shape=AdapterShape(FINGERPRINT, shape.rank, TARGETS),
                             capacity=n_adapters, check_ttl_s=3600.0)
        cold_ms = cold_loads(cache, [user_id(i) for i in range(n_adapters)])
    finally:
        server.stop()
    return {"cold_load_ms_s3_p50": statistics.median(cold_ms), "cold_load_ms_s3_p99": percentile(cold_ms, 99),
            "s3_adapters": n_adapters, "s3_adapter_mib": adapter_bytes(shape) / 2**20,
            "s3_server": "moto ThreadedMotoServer on 127.0.0.1 (CPU machine)"}


def random_llama(shape: BenchShape, device: str, **config_overrides):
    """A random-weight Llama of ``shape`` (bf16 on CUDA); ``config_overrides`` go to ``LlamaConfig``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
                            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
                            "num_key_value_heads": shape.heads, "vocab_size": shape.vocab,
                            "max_position_embeddings": 4096, **config_overrides})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_prompts(shape: BenchShape, n: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, shape.vocab, (n, shape.prompt_tokens), generator=generator).tolist()


def user_id(i: int) -> str:
    return f"user{i:05d}"


def adapter_bytes(shape: BenchShape) -> int:
    return shape.layers * len(TARGETS) * 2 * shape.rank * shape.hidden * 2


def publish_random_adapters(store: AdapterStore, shape, indices, device: str, *, fingerprint: str = FINGERPRINT,
                            user=None, task: str = TASK) -> None:
    """Write each user's random rank-``r`` PEFT adapter (bf16, q/v projections) and publish it.

    ``shape`` needs ``rank``, ``layers`` and ``hidden``; ``user(i)`` names adapter ``i`` (default ``user_id``).
    """
    user = user or user_id
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=list(TARGETS), lora_dropout=0.0,
                        task_type="CAUSAL_LM")

    def tensors_for(i: int) -> dict:
        generator = torch.Generator(device=device).manual_seed(1000 + i)
        tensors = {}
        for layer in range(shape.layers):
            for module in TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                a = torch.randn((shape.rank, shape.hidden), generator=generator, device=device) * 0.01
                b = torch.randn((shape.hidden, shape.rank), generator=generator, device=device) * 0.01
                tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
        return tensors

    def publish(i: int, tensors: dict) -> None:  # file writes and sha256 release the GIL: a few threads
        with tempfile.TemporaryDirectory(prefix="oppu-bench-adapter-") as staging:
            config.save_pretrained(staging)
            save_file(tensors, str(Path(staging) / "adapter_model.safetensors"))
            store.publish(AdapterKey(task, fingerprint, VARIANT, user(i)), staging, data_hash=f"bench-{i}",
                          config={"bench": i}, peft_method="lora", data_span={}, metrics={})

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(publish, i, tensors_for(i)) for i in indices]
        for future in futures:
            future.result()


def cold_loads(cache: AdapterCache, users: list[str]) -> list[float]:
    """Milliseconds per first ``get`` (store read, sha256 check, safetensors decode)."""
    async def load_all() -> list[float]:
        times = []
        for user in users:
            started = time.perf_counter()
            await cache.get(user)
            times.append(1000 * (time.perf_counter() - started))
        return times

    return asyncio.run(load_all())


def zipf_users(n_users: int, n_requests: int, seed: int, exponent: float = 1.0) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_users + 1) ** exponent
    return rng.choice(n_users, size=n_requests, p=weights / weights.sum()).tolist()


class HostCounts:
    """``AdapterCache``'s recorder: host-tier hits and misses (and load times) counted here."""

    def __init__(self):
        self.hits = self.misses = 0

    def cache_lookup(self, tier: str, hit: bool) -> None:
        if tier == "host":
            self.hits += hit
            self.misses += not hit

    def adapter_loaded(self, seconds: float) -> None:
        pass


def cold_uniform_mix(engine: GenerationEngine, store: AdapterStore, shape: BenchShape, prompts) -> dict:
    """Batches of users drawn uniformly from every adapter, through a fresh (cold) host tier; each batch's
    time includes its adapters' loads from the store (concurrent, as a replica's requests would be)."""
    import random

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    host = HostCounts()
    cache = AdapterCache(store, task=TASK, variant=VARIANT, shape=AdapterShape(FINGERPRINT, shape.rank, TARGETS),
                         capacity=shape.host_cache_adapters, check_ttl_s=3600.0, prepare=engine.prepare_adapter,
                         recorder=host)
    rng = random.Random(3)
    slot_before = (engine.slots.stats.hits, engine.slots.stats.misses)
    tokens, elapsed, load_s = 0, 0.0, 0.0
    for _ in range(shape.zipf_batches):
        users = [user_id(rng.randrange(shape.n_adapters)) for _ in range(shape.batch)]

        async def load(users=users):
            return await asyncio.gather(*(cache.get(u) for u in users))

        sync()
        started = time.perf_counter()
        loaded = asyncio.run(load())
        load_s += time.perf_counter() - started
        for step in engine.stream([GenerationRow(p, a, shape.new_tokens) for p, a in zip(prompts, loaded, strict=True)]):
            tokens += sum(1 for token in step if token is not None)
        sync()
        elapsed += time.perf_counter() - started
    slot_hits = engine.slots.stats.hits - slot_before[0]
    slot_misses = engine.slots.stats.misses - slot_before[1]
    return {"cold_uniform_tokens_per_s": tokens / elapsed,
            "cold_uniform_host_hit_rate": host.hits / max(1, host.hits + host.misses),
            "cold_uniform_gpu_slot_hit_rate": slot_hits / max(1, slot_hits + slot_misses),
            "cold_uniform_load_s_per_batch": load_s / shape.zipf_batches,
            "cold_uniform_note": "uniform over every adapter, a fresh host tier; time includes store reads, "
                                 "sha256 checks and packing"}


def new_shape_cost(engine: GenerationEngine, cache: AdapterCache, shape: BenchShape) -> dict:
    """A batch whose (batch, cache length) shape has not run yet: its first run compiles and captures."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rows_n = max(1, shape.batch * 5 // 8)  # pads to the same power of two as a smaller batch would
    prompts = random_prompts(BenchShape(**(shape.__dict__ | {"prompt_tokens": shape.prompt_tokens + 64})), rows_n,
                             seed=5)
    adapters = [asyncio.run(cache.get(user_id(i))) for i in range(rows_n)]
    rows = [GenerationRow(p, a, shape.new_tokens) for p, a in zip(prompts, adapters, strict=True)]
    times = []
    for _ in range(2):
        sync()
        started = time.perf_counter()
        for _ in engine.stream(rows):
            pass
        sync()
        times.append(time.perf_counter() - started)
    return {"new_shape_rows": rows_n, "new_shape_prompt_tokens": shape.prompt_tokens + 64,
            "new_shape_first_batch_s": times[0], "new_shape_warm_batch_s": times[1]}


def slot_load_times(engine: GenerationEngine, store: AdapterStore, cache: AdapterCache, shape: BenchShape,
                    n: int = 16) -> dict:
    """GPU slot loads timed to completion (synchronised): the packed path against the old per-tensor copies."""
    import torch

    from oppu.models import multi_lora

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    adapters = [asyncio.run(cache.get(user_id(i))) for i in range(n)]
    packed_ms, old_ms, pack_ms = [], [], []
    for slot, adapter in enumerate(adapters):
        sync()
        started = time.perf_counter()
        engine.slots.loader.load(slot % shape.gpu_slots, adapter.packed)
        sync()
        packed_ms.append(1000 * (time.perf_counter() - started))
        state = {k: v.clone() for k, v in adapter.state_dict.items()}  # pageable tensors, as the old path held
        sync()
        started = time.perf_counter()
        multi_lora.load_peft_adapter_into_slot(engine.model, slot % shape.gpu_slots, state, adapter.peft_config)
        sync()
        old_ms.append(1000 * (time.perf_counter() - started))
        manifest, files = store.read_files(cache.key(adapter.user))
        fresh = decode_adapter(manifest, files, cache.shape, zero_copy=True)
        started = time.perf_counter()
        engine.prepare_adapter(fresh)
        pack_ms.append(1000 * (time.perf_counter() - started))
    for slot in range(min(n, shape.gpu_slots)):  # leave the slots as the engine's bookkeeping expects: empty
        multi_lora.clear_slot(engine.model, slot)
    return {"gpu_slot_load_ms_p50": statistics.median(packed_ms),
            "gpu_slot_load_ms_p50_per_tensor_path": statistics.median(old_ms),
            "host_pack_ms_p50": statistics.median(pack_ms)}


def profile_batch(engine: GenerationEngine, rows: list[GenerationRow], out_dir: Path, steps: int = 8) -> None:
    """Kernel table of one batch's prefill and first ``steps`` decode steps (the rest runs unprofiled)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    stream = engine.stream(rows)
    with profile(activities=activities) as prof:
        for _ in zip(range(steps + 1), stream, strict=False):
            pass
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    for _ in stream:
        pass
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    (out_dir / "kernels.txt").write_text(table)
    print(f"profile of {out_dir.name} (prefill + {steps} steps), top kernels:")
    print("\n".join(table.splitlines()[:14]), flush=True)


@dataclass
class Timing:
    tokens_per_s: float
    decode_tokens_per_s: float  # after the first token (prefill, slot loads) of each batch
    ms_per_token: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    step_ms_p50: float
    step_ms_p99: float
    first_batch_s: float  # the warm-up batch: slot loads and, for a new shape, compile and graph capture
    batch_s: float  # mean of the timed batches


def timed_batches(engine: GenerationEngine, batches: list[list[GenerationRow]]) -> Timing:
    """Run every batch (the first only warms up: graph capture, slot loads) and time the rest."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    ttfts, steps, decode_ms_per_token = [], [], []
    tokens, elapsed, first_tokens, first_elapsed, warmup_s = 0, 0.0, 0, 0.0, 0.0
    for index, rows in enumerate(batches):
        sync()
        started = last = time.perf_counter()
        step_times = []
        for step in engine.stream(rows):
            now = time.perf_counter()
            step_times.append(now - last)
            last = now
            if index:
                tokens += sum(1 for token in step if token is not None)
                if len(step_times) == 1:
                    first_tokens += sum(1 for token in step if token is not None)
        if index == 0:
            sync()
            warmup_s = time.perf_counter() - started
            continue
        elapsed += last - started
        first_elapsed += step_times[0]
        ttfts.append(1000 * step_times[0])
        steps.extend(1000 * t for t in step_times[1:])
        decode_ms_per_token.append(1000 * sum(step_times[1:]) / max(1, len(step_times) - 1))
    return Timing(tokens_per_s=tokens / elapsed,
                  decode_tokens_per_s=(tokens - first_tokens) / (elapsed - first_elapsed),
                  ms_per_token=statistics.median(decode_ms_per_token),
                  ttft_ms_p50=statistics.median(ttfts), ttft_ms_p99=percentile(ttfts, 99),
                  step_ms_p50=statistics.median(steps), step_ms_p99=percentile(steps, 99),
                  first_batch_s=warmup_s, batch_s=elapsed / (len(batches) - 1))


_STARTED = time.perf_counter()


def progress(what: str, timing: Timing | None) -> None:
    detail = f": {timing.ms_per_token:.2f} ms/token, {timing.tokens_per_s:.0f} tokens/s" if timing else ""
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {what}{detail}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def print_table(results: dict) -> None:
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:36s} {value:12.3f}")
        elif not isinstance(value, dict):
            print(f"{key:36s} {value}")


if __name__ == "__main__":
    sys.exit(main())
