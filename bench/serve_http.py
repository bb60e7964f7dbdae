"""What a client sees over HTTP: the real Ray Serve app under open- and closed-loop load on one GPU.

    python bench/serve_http.py                      # GPU, ~6-8 min with setup; writes bench/results/serve_http.json
    python bench/serve_http.py --tiny --out /tmp/serve_http.json   # CPU smoke test of this script (toy sizes)

Setup: a random-initialised Llama-2-7B-shaped model in bf16 with a 32,000-word word-level tokenizer
that has no end-of-sequence token (every request decodes its whole budget), saved to a temporary
directory; two disjoint populations of 1,000 distinct rank-8 q/v adapters each in a local store
(Zipf users and uniform users, so each mix starts from a cold host cache); the app started in this
process with ``serve_apps.oppu_serve:build`` (``host_cache_adapters`` 256 < 1,000, 64 GPU slots,
``max_batch_size`` 64). Requests are streaming ``/v1/completions`` with ``stream_options.include_usage``,
greedy, prompt lengths log-normal (median 96 words, 16..384) and ``max_tokens`` uniform in 32..256,
drawn from a seeded generator.

Phases, in order, in one run:
- the engine alone (``ContinuousBatcher`` on the same model, no HTTP): 32 sequences in flight, closed loop;
- the same with the replica's LoRA slots injected (every row a base row), the one-token update eager and
  then compiled: what the slots cost apart from HTTP and Ray (``engine_slots*``);
- base model over HTTP, closed loop at concurrency 1, 8, 32, 64 (concurrency 1 gives the unloaded TTFT);
- Zipf(1.0) mix over the first 1,000 adapters at concurrency 32, from a cold host cache;
- uniform mix over the other 1,000 adapters at concurrency 32, from a cold host cache;
- open loop: Poisson arrivals of the Zipf mix at 0.25, 0.5, 0.75, 1.0 and 1.25 times the request rate
  the Zipf phase sustained (``load_fraction``).

Figures: tokens/s counts tokens streamed inside the phase's window; TTFT is from sending the request to
its first token; ITL is the gap between consecutive tokens of one request; goodput is requests per
second that met both TTFT <= 500 ms and a mean ITL <= 50 ms. ``--compile-lora`` serves with the app's
``compile_lora_decode`` (recorded as ``replica_compile_lora_decode``). The log goes to stdout and, when the
environment has ``OUT``, to ``$OUT/serve_http.log`` (the JSON is copied there too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import serve as serve_bench  # noqa: E402
from bench.serve import percentile, publish_random_adapters  # noqa: E402

TASK = "LaMP-2M"
ADMIN_TOKEN = "bench-admin-token"
TTFT_SLO_S, ITL_SLO_S = 0.5, 0.05
MAX_PROMPT_TOKENS = 1024  # the serve app's max_prompt_tokens
SERVED_MODULES = ("q_proj", "v_proj")  # the adapters' target modules, as the app is configured


@dataclass(frozen=True)
class HttpShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    n_adapters: int  # per population (Zipf users, uniform users)
    rank: int
    gpu_slots: int
    host_cache_adapters: int
    max_batch_size: int
    concurrencies: tuple[int, ...]
    poisson_fractions: tuple[float, ...]
    phase_s: float
    prompt_words: tuple[int, int, int]  # median, min, max
    max_tokens: tuple[int, int]  # uniform range
    prefill_chunk_tokens: int
    stream_interval_ms: float = 25.0  # the serve app's default
    gil_switch_interval_ms: float = 0.5  # the serve app's default


FULL = HttpShape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000, n_adapters=1000, rank=8,
                 gpu_slots=64, host_cache_adapters=256, max_batch_size=64, concurrencies=(1, 8, 32, 64),
                 poisson_fractions=(0.25, 0.5, 0.75, 1.0, 1.25), phase_s=15.0, prompt_words=(96, 16, 384),
                 max_tokens=(32, 256), prefill_chunk_tokens=2048)
TINY = HttpShape(hidden=64, intermediate=128, layers=2, heads=4, vocab=512, n_adapters=24, rank=8, gpu_slots=8,
                 host_cache_adapters=8, max_batch_size=8, concurrencies=(1, 4), poisson_fractions=(0.5, 1.0),
                 phase_s=3.0, prompt_words=(12, 4, 32), max_tokens=(4, 16), prefill_chunk_tokens=64)
# CPU-sized, but with the full run's batch and concurrency: where the HTTP path's own costs show up
# against the engine's without a GPU (a decode step of a few milliseconds, 32 streams).
CPU32 = HttpShape(hidden=128, intermediate=256, layers=2, heads=4, vocab=2000, n_adapters=200, rank=8, gpu_slots=32,
                  host_cache_adapters=64, max_batch_size=32, concurrencies=(1, 32), poisson_fractions=(0.5,),
                  phase_s=8.0, prompt_words=(24, 8, 64), max_tokens=(16, 64), prefill_chunk_tokens=512)

_STARTED = time.perf_counter()
_LOG = None


def log(message: str) -> None:
    line = f"[{time.perf_counter() - _STARTED:7.1f}s] {message}"
    print(line, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


def main() -> int:
    global _LOG
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on any device: a smoke test of this script")
    parser.add_argument("--cpu32", action="store_true",
                        help="a CPU-sized model at the full run's batch and concurrency (32 streams)")
    parser.add_argument("--out", help="results file (default bench/results/serve_http.json; "
                        "with --engine-only serve_http-engine.json)")
    parser.add_argument("--phase-s", type=float, help="seconds per load phase (default: the shape's)")
    parser.add_argument("--engine-only", action="store_true",
                        help="only the engine phases (without and with LoRA slots; no adapters, no HTTP): "
                        "a quick check of the decode path")
    parser.add_argument("--compile-lora", action="store_true",
                        help="the serve app's compile_lora_decode (the adapters' one-token update compiled)")
    parser.add_argument("--stream-interval-ms", type=float,
                        help="the serve app's stream_interval_ms (default: the app's default, 25)")
    parser.add_argument("--gil-switch-interval-ms", type=float,
                        help="the serve app's gil_switch_interval_ms (default: the app's default, 0.5; Python's is 5)")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results"
                               / ("serve_http-engine.json" if args.engine_only else "serve_http.json"))
    shape = TINY if args.tiny else CPU32 if args.cpu32 else FULL
    if args.tiny or args.cpu32:
        import torch

        torch.set_num_threads(1)  # the smoke test's engine phase shares a few CPU cores with Ray
    if args.phase_s:
        shape = HttpShape(**(shape.__dict__ | {"phase_s": args.phase_s}))
    if args.stream_interval_ms is not None:
        shape = HttpShape(**(shape.__dict__ | {"stream_interval_ms": args.stream_interval_ms}))
    if args.gil_switch_interval_ms is not None:
        shape = HttpShape(**(shape.__dict__ | {"gil_switch_interval_ms": args.gil_switch_interval_ms}))
    out_dir = os.environ.get("OUT")
    if out_dir:
        _LOG = open(Path(out_dir) / "serve_http.log", "w")  # noqa: SIM115 (open for the whole run)
    results: dict = {}
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # `timeout` cuts a run: keep its partial figures
    try:
        run(shape, results, engine_only=args.engine_only, compile_lora=args.compile_lora)
    except BaseException as exc:  # keep what was measured for the log, never as the results file
        results["error"] = f"{type(exc).__name__}: {exc}"
        if out_dir:
            (Path(out_dir) / "serve_http.partial.json").write_text(json.dumps(results, indent=2) + "\n")
        log(f"failed after {time.perf_counter() - _STARTED:.0f} s: {results['error']}")
        raise
    results["command"] = "python " + " ".join(sys.argv)
    text = json.dumps(results, indent=2) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if out_dir:
        (Path(out_dir) / "serve_http.json").write_text(text)
    log(f"wrote {args.out}")
    print_summary(results)
    return 0


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(shape: HttpShape, out: dict, engine_only: bool = False, compile_lora: bool = False) -> None:
    """Every phase in order; figures go into ``out`` as they are measured."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="oppu-serve-http-"))
    out.update({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": shape.__dict__,
                "slo": {"ttft_ms": 1000 * TTFT_SLO_S, "mean_itl_ms": 1000 * ITL_SLO_S}})
    tokenizer = word_tokenizer(shape.vocab)
    model = random_llama(shape, tokenizer, device)
    base = work / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    log(f"random {shape.layers}-layer model saved to {base}")
    workload = Workload(shape, seed=0)

    from oppu.serving.engine import GenerationEngine, LoraSlotsConfig
    from oppu.serving.lora import use_serving_layers

    rows = min(32, shape.max_batch_size)
    out["engine_base_batch32"] = engine_closed_loop(GenerationEngine(model, tokenizer, None), workload, rows,
                                                    shape.phase_s, "base model without LoRA slots")
    free_device_memory()
    out["engine_base_batch32_tokens_per_s"] = out["engine_base_batch32"]["tokens_per_s"]
    log_engine("engine alone, 32 in flight", out["engine_base_batch32"])
    # The replica's graphs carry its LoRA slots' per-row update in every layer, base rows included:
    # the same engine with the replica's slots (every row a base row), eager and compiled, says what
    # that costs apart from HTTP and Ray.
    slotted = GenerationEngine(model, tokenizer, LoraSlotsConfig(shape.gpu_slots, shape.rank, SERVED_MODULES))
    for key, compiled in (("engine_slots_batch32", False), ("engine_slots_compiled_batch32", True)):
        use_serving_layers(slotted.model, compile_one_token=compiled)
        out[key] = engine_closed_loop(slotted, workload, rows, shape.phase_s,
                                      f"with the replica's {shape.gpu_slots} LoRA slots, base rows, "
                                      f"one-token update {'compiled (on CUDA)' if compiled else 'eager'}")
        out[f"{key}_tokens_per_s"] = out[key]["tokens_per_s"]
        free_device_memory()
        log_engine(f"engine with {shape.gpu_slots} LoRA slots ({'compiled' if compiled else 'eager'} update), "
                   "32 in flight", out[key])
    del slotted
    if engine_only:
        return
    del model
    free_device_memory()

    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    fingerprint = base_fingerprint(base)
    store_uri = str(work / "store")
    store = AdapterStore(store_uri)
    started = time.perf_counter()
    adapter_shape = SimpleNamespace(rank=shape.rank, layers=shape.layers, hidden=shape.hidden)
    for population in ("zipf", "uniform"):
        publish_random_adapters(store, adapter_shape, range(shape.n_adapters), device, fingerprint=fingerprint,
                                user=lambda i, p=population: f"{p}{i:05d}", task=TASK)
    out["publish_s"] = time.perf_counter() - started
    log(f"published 2 x {shape.n_adapters} adapters in {out['publish_s']:.0f} s")

    out["replica_compile_lora_decode"] = compile_lora
    url = start_app(shape, base, store_uri, device, compile_lora)
    try:
        asyncio.run(load_phases(shape, url, workload, out))
        out["replica_stats"] = replica_stats()
    finally:
        from ray import serve

        serve.shutdown()


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ``w0 .. w{vocab-4}`` with BOS and padding but no end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<pad>": 1, "<s>": 2} | {f"w{i}": i + 3 for i in range(vocab - 3)}
    raw = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def random_llama(shape: HttpShape, tokenizer, device: str):
    """``bench/serve.py``'s random Llama with this tokenizer's ids and no EOS (every stream runs to max_tokens)."""
    model = serve_bench.random_llama(shape, device, pad_token_id=tokenizer.pad_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=None)
    model.generation_config.eos_token_id = None
    return model


class Workload:
    """Seeded prompts (log-normal word counts) and output budgets (uniform), and the two user mixes."""

    def __init__(self, shape: HttpShape, seed: int):
        import numpy as np

        self.shape = shape
        self.rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, shape.n_adapters + 1)
        self.zipf_p = weights / weights.sum()

    def prompt(self) -> str:
        median, low, high = self.shape.prompt_words
        n = int(min(high, max(low, round(self.rng.lognormal(mean=math.log(median), sigma=0.6)))))
        return " ".join(f"w{int(i)}" for i in self.rng.integers(0, self.shape.vocab - 3, size=n))

    def max_tokens(self) -> int:
        low, high = self.shape.max_tokens
        return int(self.rng.integers(low, high + 1))

    def model(self, mix: str) -> str:
        if mix == "base":
            return "base"
        if mix == "zipf":
            return f"base:zipf{int(self.rng.choice(self.shape.n_adapters, p=self.zipf_p)):05d}"
        return f"base:uniform{int(self.rng.integers(self.shape.n_adapters)):05d}"


def log_engine(name: str, engine: dict) -> None:
    log(f"{name}: {engine['tokens_per_s']:.0f} tokens/s (cuda_graphs={engine['cuda_graphs']}, "
        f"{engine['graph_captures']} graphs captured, {engine['graph_captures_in_window']} in the window; "
        f"decode {engine['decode_ms_per_step']:.1f} ms a step, prefill {engine['prefill_ms_per_chunk']:.1f} ms a chunk, "
        f"{100 * engine['prefill_share_of_window']:.0f}% of the window in prefill; warm-up {engine['warm_up_s']:.1f} s"
        + (f"; capture failed: {engine['graph_capture_error']}" if engine["graph_capture_error"] else "") + ")")


def engine_closed_loop(engine, workload: Workload, rows: int, seconds: float, what: str) -> dict:
    """The replica's scheduler over ``engine``, no HTTP: ``rows`` sequences always in flight."""
    from oppu.serving.sampling import SamplingParams
    from oppu.serving.scheduler import ContinuousBatcher
    from oppu.serving.sequences import FinishEvent, SequenceRequest, TokenEvent

    batcher = ContinuousBatcher(engine, max_batch_size=rows, max_waiting=rows,
                                prefill_chunk_tokens=workload.shape.prefill_chunk_tokens)
    times: list[float] = []
    in_flight = [0]

    def submit():
        ids = engine.encode(workload.prompt())
        in_flight[0] += 1

        def sink(event):
            if isinstance(event, TokenEvent):
                times.append(time.perf_counter())
            elif isinstance(event, FinishEvent):
                in_flight[0] -= 1

        batcher.submit(SequenceRequest(ids, None, workload.max_tokens(), SamplingParams(temperature=0.0)), sink)

    batcher.warm_up(MAX_PROMPT_TOKENS + workload.shape.max_tokens[1])  # as the replica does before serving
    for _ in range(rows):  # a warm-up round: first kernels and allocations outside the window
        submit()
    while in_flight[0]:
        batcher.step()
    times.clear()
    captures_before = batcher.cache.graphs.captures
    before = dataclasses.replace(batcher.stats)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        while in_flight[0] < rows:
            submit()
        batcher.step()
    window = time.perf_counter() - started
    return {"tokens_per_s": sum(1 for t in times if t >= started) / window, "rows": rows, "window_s": window,
            "warm_up_s": batcher.stats.warm_up_s, "kv_rows": batcher.cache.rows, "kv_columns": batcher.cache.columns,
            "decode_steps": batcher.stats.steps - before.steps,
            "prefill_chunks": batcher.stats.prefill_chunks - before.prefill_chunks,
            "decode_ms_per_step": 1000 * (batcher.stats.decode_s - before.decode_s)
            / max(1, batcher.stats.steps - before.steps),
            "prefill_ms_per_chunk": 1000 * (batcher.stats.prefill_s - before.prefill_s)
            / max(1, batcher.stats.prefill_chunks - before.prefill_chunks),
            "prefill_share_of_window": (batcher.stats.prefill_s - before.prefill_s) / window,
            "graph_captures": batcher.cache.graphs.captures,
            "graph_captures_in_window": batcher.cache.graphs.captures - captures_before,
            "graph_capture_error": batcher.cache.graphs.error,
            "cuda_graphs": batcher.cache.graphs.enabled, "note": "ContinuousBatcher (the replica's scheduler), no HTTP, "
            f"same prompt/output distributions, {what}"}


def free_device_memory() -> None:
    """After a phase: its KV rows and graph pool go back before the next phase allocates its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def start_app(shape: HttpShape, base: Path, store_uri: str, device: str, compile_lora: bool = False) -> str:
    import ray
    from ray import serve

    from serve_apps.oppu_serve import build

    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN_TOKEN
    # Workers inherit this process's environment (PYTHONPATH with the project root and, on the GPU
    # machine, the bundle's site directory).
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}})
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    args = {"model": str(base), "store": store_uri,
            "task": TASK, "model_id": "base", "device": device,
            "dtype": "bfloat16" if device == "cuda" else "float32", "gpu_slots": shape.gpu_slots,
            "host_cache_adapters": shape.host_cache_adapters, "max_lora_rank": shape.rank,
            "target_modules": ",".join(SERVED_MODULES), "max_batch_size": shape.max_batch_size,
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "prefill_chunk_tokens": shape.prefill_chunk_tokens, "stream_interval_ms": shape.stream_interval_ms,
            "gil_switch_interval_ms": shape.gil_switch_interval_ms,
            "max_tokens_limit": shape.max_tokens[1], "default_max_tokens": shape.max_tokens[0],
            "max_queued_requests": 512, "model_max_ongoing_requests": 512, "ingress_max_ongoing_requests": 1024,
            "request_timeout_s": 600, "adapter_check_ttl_s": 3600, "default_temperature": 0.0,
            "compile_lora_decode": compile_lora,
            "num_gpus_per_replica": 1 if device == "cuda" else 0, "num_cpus_per_replica": 4 if device == "cuda" else 1}
    started = time.perf_counter()
    serve.run(build({key: str(value) for key, value in args.items()}), name="oppu", route_prefix="/")
    log(f"serve app ready in {time.perf_counter() - started:.0f} s: {args}")
    return "http://127.0.0.1:8000"


def replica_stats() -> dict:
    from ray import serve

    stats = serve.get_deployment_handle("model", app_name="oppu").stats.remote().result()
    return {key: value for key, value in stats.items() if not isinstance(value, list)}


async def replica_stats_now() -> dict:
    from ray import serve

    return await serve.get_deployment_handle("model", app_name="oppu").stats.remote()


def cache_rates(before: dict, after: dict) -> dict:
    """Host-tier and GPU-slot hit rates of the lookups between two ``replica_stats`` snapshots."""
    def rate(hits: str, misses: str) -> float | None:
        h, m = after[hits] - before[hits], after[misses] - before[misses]
        return h / (h + m) if h + m else None

    return {"host_cache_hit_rate": rate("host_hits", "host_misses"), "gpu_slot_hit_rate": rate("gpu_hits", "gpu_misses")}


@dataclass
class Record:
    sent: float
    first: float | None = None
    token_times: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    status: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def chunk_gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    def add_chunk(self, now: float, tokens: int) -> None:
        """A chunk of ``tokens`` arrived ``now``. The replica sends what was generated since its last chunk
        (``stream_interval_ms``), so its tokens are spread evenly over the gap since the previous chunk:
        counting them all as arriving now would give zero gaps and flatter the inter-token latency."""
        if self.first is None:
            self.first = now
            self.token_times.extend([now] * tokens)
        else:
            previous = self.token_times[-1]
            self.token_times.extend(previous + (now - previous) * (i + 1) / tokens for i in range(tokens))
        self.chunk_times.append(now)

    @property
    def good(self) -> bool:
        itls = self.itls
        return (self.status == 200 and self.error is None and self.ttft is not None and self.ttft <= TTFT_SLO_S
                and (not itls or statistics.fmean(itls) <= ITL_SLO_S))


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> Record:
    record = Record(sent=time.perf_counter())
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = (await response.aread()).decode()[:300]
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = json.dumps(event["error"])[:300]
                elif event["choices"] and event["choices"][0]["text"]:
                    # With the word-level vocabulary a chunk's tokens are its words.
                    record.add_chunk(now, max(1, len(event["choices"][0]["text"].split())))
                elif event.get("usage"):
                    record.completion_tokens = event["usage"]["completion_tokens"]
    except Exception as exc:  # a transport failure counts against the phase, it does not end the run
        record.error = f"{type(exc).__name__}: {exc}"
    return record


def summarize(name: str, records: list[Record], started: float, ended: float) -> dict:
    window = ended - started
    tokens_in_window = sum(1 for r in records for t in r.token_times if started <= t <= ended)
    ttfts = [1000 * r.ttft for r in records if r.ttft is not None]
    itls = [1000 * gap for r in records for gap in r.itls]
    chunk_gaps = [1000 * gap for r in records for gap in r.chunk_gaps]
    done = [r for r in records if r.status == 200 and r.error is None]
    out = {"requests": len(records), "completed": len(done), "errors": len(records) - len(done),
           "tokens_per_s": tokens_in_window / window, "requests_per_s": len(done) / window,
           "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
           "ttft_ms_p99": percentile(ttfts, 99) if ttfts else None,
           "itl_ms_p50": statistics.median(itls) if itls else None, "itl_ms_p99": percentile(itls, 99) if itls else None,
           # the longest pauses a reader sees between two chunks of one stream
           "chunk_gap_ms_p99": percentile(chunk_gaps, 99) if chunk_gaps else None,
           "tokens_per_chunk": sum(len(r.token_times) for r in records) / max(1, sum(len(r.chunk_times) for r in records)),
           "goodput": sum(1 for r in records if r.good) / window,
           "goodput_fraction": sum(1 for r in records if r.good) / max(1, len(records)),
           # tokens counted from the streamed text against the usage counts (special tokens stream no text)
           "streamed_vs_usage_tokens": sum(len(r.token_times) for r in done)
           / max(1, sum(r.completion_tokens for r in done)),
           "window_s": window}
    errors = [r.error for r in records if r.error][:3]
    if errors:
        out["first_errors"] = errors
    log(f"{name}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()})}")
    return out


async def closed_loop(client, url: str, workload: Workload, mix: str, concurrency: int, seconds: float,
                      name: str) -> dict:
    records: list[Record] = []
    started = time.perf_counter()
    stop = started + seconds

    async def worker():
        while time.perf_counter() < stop:
            records.append(await one_request(client, url, workload.model(mix), workload.prompt(),
                                             workload.max_tokens()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(name, records, started, stop)


async def open_loop(client, url: str, workload: Workload, mix: str, rate: float, seconds: float, name: str,
                    drain_s: float = 30.0) -> dict:
    """Poisson arrivals at ``rate`` per second for ``seconds``; requests still running ``drain_s`` later are dropped."""
    tasks = []
    started = time.perf_counter()
    arrival = started
    while True:
        arrival += float(workload.rng.exponential(1.0 / rate))
        if arrival >= started + seconds:
            break
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(one_request(client, url, workload.model(mix), workload.prompt(),
                                                     workload.max_tokens())))
    done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    records = [task.result() for task in done] + [Record(sent=started, error="still running at the drain limit")
                                                  for _ in pending]
    return summarize(name, records, started, started + seconds)


async def graphs_so_far(phase: dict) -> dict:
    """Add the replica's CUDA-graph state to a phase's figures (captures during a phase cost its streams)."""
    stats = await replica_stats_now()
    last = dict(_LAST_REPLICA_STATS) or {key: 0 for key in ("decode_steps", "decode_s", "prefill_chunks", "prefill_s")}
    _LAST_REPLICA_STATS.clear()
    _LAST_REPLICA_STATS.update(stats)
    steps, chunks = stats["decode_steps"] - last["decode_steps"], stats["prefill_chunks"] - last["prefill_chunks"]
    phase.update({"cuda_graphs": stats.get("cuda_graphs"), "graph_captures_so_far": stats.get("graph_captures"),
                  "kv_rows": stats.get("kv_rows"), "kv_columns": stats.get("kv_columns"),
                  "graph_capture_error": stats.get("graph_capture_error"),
                  # since the previous phase's check (this phase and the pause before it)
                  "replica_decode_steps": steps,
                  "replica_decode_ms_per_step": 1000 * (stats["decode_s"] - last["decode_s"]) / max(1, steps),
                  "replica_prefill_chunks": chunks,
                  "replica_prefill_ms_per_chunk": 1000 * (stats["prefill_s"] - last["prefill_s"]) / max(1, chunks)})
    log(f"  replica: cuda_graphs={phase['cuda_graphs']}, graphs captured so far {phase['graph_captures_so_far']}, "
        f"KV cache {phase['kv_rows']} rows x {phase['kv_columns']} columns; {steps} decode steps at "
        f"{phase['replica_decode_ms_per_step']:.1f} ms, {chunks} prefill chunks at "
        f"{phase['replica_prefill_ms_per_chunk']:.1f} ms"
        + (f"; capture failed: {phase['graph_capture_error']}" if phase["graph_capture_error"] else ""))
    return phase


_LAST_REPLICA_STATS: dict = {}


async def load_phases(shape: HttpShape, url: str, workload: Workload, out: dict) -> None:
    import httpx

    out["closed_loop_base"] = {}
    limits = httpx.Limits(max_connections=4 * max(shape.concurrencies) + 64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        await graphs_so_far(await closed_loop(client, url, workload, "base", min(8, shape.max_batch_size),
                                              min(5.0, shape.phase_s), "warm-up (base, not reported)"))
        for concurrency in shape.concurrencies:
            out["closed_loop_base"][str(concurrency)] = await graphs_so_far(await closed_loop(
                client, url, workload, "base", concurrency, shape.phase_s, f"base, concurrency {concurrency}"))
        out["unloaded_ttft_ms_p50"] = out["closed_loop_base"][str(shape.concurrencies[0])]["ttft_ms_p50"]
        c32 = 32 if 32 in shape.concurrencies else shape.concurrencies[-1]
        before = await replica_stats_now()
        zipf = await closed_loop(client, url, workload, "zipf", c32, shape.phase_s,
                                 f"Zipf over {shape.n_adapters} adapters, cold host cache, concurrency {c32}")
        middle = await replica_stats_now()
        await graphs_so_far(zipf)
        uniform = await closed_loop(client, url, workload, "uniform", c32, shape.phase_s,
                                    f"uniform over {shape.n_adapters} other adapters, cold host cache, "
                                    f"concurrency {c32}")
        after = await replica_stats_now()
        await graphs_so_far(uniform)
        zipf.update(cache_rates(before, middle))
        uniform.update(cache_rates(middle, after))
        log(f"cache hit rates: Zipf {cache_rates(before, middle)}, uniform {cache_rates(middle, after)}")
        base = out["closed_loop_base"][str(c32)]
        out["closed_loop_zipf"], out["closed_loop_uniform"] = zipf, uniform
        out["concurrency_32"] = {
            "concurrency": c32, "base_tokens_per_s": base["tokens_per_s"],
            "adapters_zipf_tokens_per_s": zipf["tokens_per_s"], "adapters_uniform_tokens_per_s": uniform["tokens_per_s"],
            # latency figures of the Zipf adapter mix (the base phase's are under closed_loop_base)
            "ttft_ms_p50": zipf["ttft_ms_p50"], "ttft_ms_p99": zipf["ttft_ms_p99"],
            "itl_ms_p50": zipf["itl_ms_p50"], "itl_ms_p99": zipf["itl_ms_p99"]}
        capacity_rps = zipf["requests_per_s"]
        out["poisson_capacity_requests_per_s"] = capacity_rps
        out["poisson"] = []
        for fraction in shape.poisson_fractions:
            rate = fraction * capacity_rps
            phase = await graphs_so_far(await open_loop(client, url, workload, "zipf", rate, shape.phase_s,
                                                        f"Poisson {rate:.2f} req/s ({fraction:.2f} x capacity), Zipf mix"))
            out["poisson"].append({"rate": rate, "load_fraction": fraction, "ttft_ms_p50": phase["ttft_ms_p50"],
                                   "ttft_ms_p99": phase["ttft_ms_p99"], "goodput": phase["goodput"],
                                   "goodput_fraction": phase["goodput_fraction"], "itl_ms_p50": phase["itl_ms_p50"],
                                   "itl_ms_p99": phase["itl_ms_p99"], "requests": phase["requests"],
                                   "errors": phase["errors"]})


def print_summary(results: dict) -> None:
    print(f"\n{'device':40s} {results['device']}")
    print(f"{'engine alone, 32 in flight (tokens/s)':40s} {results['engine_base_batch32_tokens_per_s']:10.0f}")
    print(f"{'  with LoRA slots, eager update':40s} {results['engine_slots_batch32_tokens_per_s']:10.0f}")
    print(f"{'  with LoRA slots, compiled update':40s} {results['engine_slots_compiled_batch32_tokens_per_s']:10.0f}")
    if "concurrency_32" not in results:  # --engine-only
        return
    c32 = results["concurrency_32"]
    for key in ("base_tokens_per_s", "adapters_zipf_tokens_per_s", "adapters_uniform_tokens_per_s", "ttft_ms_p50",
                "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"):
        print(f"{'HTTP c=' + str(c32['concurrency']) + ' ' + key:40s} {_fmt(c32[key])}")
    print(f"{'unloaded TTFT p50 (ms)':40s} {_fmt(results['unloaded_ttft_ms_p50'])}")
    for row in results["poisson"]:
        print(f"Poisson {row['rate']:6.2f} req/s ({row['load_fraction']:.2f}x): TTFT p50 {_fmt(row['ttft_ms_p50'])} "
              f"p99 {_fmt(row['ttft_ms_p99'])} ms, goodput {row['goodput']:.2f} req/s")


def _fmt(value: float | None) -> str:
    return f"{value:10.1f}" if value is not None else f"{'-':>10s}"


if __name__ == "__main__":
    sys.exit(main())
