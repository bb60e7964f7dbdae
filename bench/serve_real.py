"""The real chat model through the whole serving path: SmolLM2-135M-Instruct with users' adapters,
a few hundred requests from the ``openai`` client against the real Ray Serve app.

    python3 bench/serve_real.py                                  # CPU: ~5 min; bench/results/serve_real.json
    python3 bench/serve_real.py --model /tmp/ship/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/serve_real.json

Setup: ``--users`` users, each with a taste no model has by default (user i tags every film with
the i-th of LaMP-2M's tags), get a LoRA trained through the chat template with the project's own
per-user trainer (r=8 on q/v, the six descriptions of tests/real_model_data.py, 6 epochs) and
published to a local store. Each user's greedy answer to the probe prompts is taken offline,
through ``PeftModel`` alone, before the app starts. Then the app (``serve_apps.oppu_serve:build``)
serves the base and the adapters on 127.0.0.1, and ``--requests`` requests go out from
``openai.AsyncOpenAI`` at ``--concurrency``, cycling through these kinds:

- ``chat_greedy``: a user's model, temperature 0: its text must equal the offline answer and
  parse to the user's tag;
- ``chat_stream``: the same, streamed with ``stream_options.include_usage`` (time to first token);
- ``chat_seeded``: temperature 0.8, top_p 0.9 and a seed, sent twice: both texts must be equal;
- ``completion_stop``: ``/v1/completions`` with a stop string: no text past it;
- ``chat_n2``: ``n=2`` sampled choices: two choices come back;
- ``base_greedy``: the base model, temperature 0: its text must equal the base's offline answer.

Every request must succeed and every check hold; the command exits 1 otherwise. Figures: requests,
failures by kind, latency p50/p99, TTFT p50/p99 of the streams, completion tokens per second over
the load, and each check's pass count. On a GPU the app runs in bfloat16 and the offline answers in
the same dtype; near-ties may still flip a greedy token there (the scheduler's equality tests are
float32), so exact-text matches are counted and reported, while the tag check must hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = "LaMP-2M"
ADMIN_TOKEN = "serve-real-admin"
MODEL_ID = "smollm2"
PROBES = [
    "A soldier returns home from the war to his family.",
    "A group of friends gets lost on a mountain during a storm.",
    "An old musician teaches a child to play the violin.",
]
KINDS = ("chat_greedy", "chat_stream", "chat_seeded", "completion_stop", "chat_n2", "base_greedy")
MAX_TOKENS = 8


def log(message: str) -> None:
    print(f"[serve_real {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="named model, .gguf path or model dir")
    parser.add_argument("--users", type=int, default=4, help="users with their own adapter (at most 8)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_real.json"))
    args = parser.parse_args()
    if not 1 <= args.users <= 8:
        parser.error("--users must be 1..8")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    work = Path(tempfile.mkdtemp(prefix="oppu-serve-real-"))
    from oppu.models import resolve_model_dir
    from oppu.serving.config import load_serve_config

    model_dir = resolve_model_dir(args.model)
    app = app_args(model_dir, str(work / "store"), device)
    load_serve_config(app)  # a bad setting fails here, not after the users' training
    users, offline = train_users(model_dir, args.users, device, work)
    url = start_app(app)
    try:
        started = time.perf_counter()
        outcomes = asyncio.run(send_all(url, users, offline, args.requests, args.concurrency))
        load_s = time.perf_counter() - started
    finally:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
    results = summarise(outcomes, load_s)
    results.update({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "command": "python3 " + " ".join(sys.argv), "model": args.model,
                    "users": {user: tag for user, tag in users.items()}, "requests": args.requests,
                    "concurrency": args.concurrency, "max_tokens": MAX_TOKENS,
                    "measured": time.strftime("%Y-%m-%d")})
    text = json.dumps(results, indent=2) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")
    print(text)
    return 0 if results["all_ok"] else 1


def train_users(model_dir: Path, n_users: int, device: str, work: Path):
    """Each user's adapter trained and published; the offline greedy answers of base and users."""
    import torch
    from peft import PeftModel

    from oppu.models import base_fingerprint, generate_greedy, load_model
    from oppu.run_config import OptimSettings, PeftSettings
    from oppu.store import AdapterKey, AdapterStore
    from oppu.tasks import get_task
    from oppu.training.personal import train_user_adapter
    from tests.real_model_data import DESCRIPTIONS

    task = get_task(TASK)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_model(str(model_dir))
    model.to(device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tags = [tag for tag in task.labels if tag != "comedy"][:n_users]  # 'comedy' is what the base says most
    users = {f"user{i}": tag for i, tag in enumerate(tags)}
    prompts = [task.build_prompt({"description": d}) for d in PROBES]
    lora = PeftSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]).to_peft_config()
    store = AdapterStore(str(work / "store"))
    fingerprint = base_fingerprint(model_dir)
    offline = {"base": generate_greedy(model.to(dtype), tokenizer, prompts, MAX_TOKENS, prompt_format="chat")}
    for user, tag in users.items():
        started = time.perf_counter()
        samples = [task.history_sample({"description": d, "tag": tag}) for d in DESCRIPTIONS]
        adapter_dir = work / "adapters" / user
        model.float()
        stats = train_user_adapter(model, tokenizer, samples, lora,
                                   OptimSettings(lr=3e-3, batch_size=6, warmup_ratio=0.0, max_length=256),
                                   epochs=6, seed=0, user_id=user, out_dir=adapter_dir, prompt_format="chat")
        personal = PeftModel.from_pretrained(model.to(dtype), str(adapter_dir)).eval()
        offline[user] = generate_greedy(personal, tokenizer, prompts, MAX_TOKENS, prompt_format="chat")
        personal.unload()  # back to the plain base for the next user
        store.publish(AdapterKey(TASK, fingerprint, "oppu", user), adapter_dir, data_hash=f"{user}-data",
                      config={"variant": "oppu", "prompt_format": "chat"}, peft_method="lora",
                      data_span={"n_items": len(samples)}, metrics={"final_loss": stats.final_loss})
        log(f"{user} ({tag}): trained in {time.perf_counter() - started:.0f} s, final loss "
            f"{stats.final_loss:.3f}; offline answers {offline[user]}")
    del model
    return users, {"prompts": prompts, "answers": offline}


def app_args(model_dir: Path, store_uri: str, device: str) -> dict[str, str]:
    app = {"model": str(model_dir), "store": store_uri, "task": TASK, "model_id": MODEL_ID, "device": device,
           "dtype": "bfloat16" if device == "cuda" else "float32", "gpu_slots": 16, "host_cache_adapters": 16,
           "max_batch_size": 16, "max_tokens_limit": 32, "default_max_tokens": MAX_TOKENS,
           "num_gpus_per_replica": 1 if device == "cuda" else 0, "num_cpus_per_replica": 1,
           "max_queued_requests": 512, "model_max_ongoing_requests": 256, "request_timeout_s": 600}
    return {key: str(value) for key, value in app.items()}


def start_app(app: dict[str, str]) -> str:
    import ray
    from ray import serve

    from serve_apps.oppu_serve import build

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN_TOKEN
    env = {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}
    if os.environ.get("OPPU_CACHE_DIR"):
        env["OPPU_CACHE_DIR"] = os.environ["OPPU_CACHE_DIR"]
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    serve.run(build(app), name="oppu", route_prefix="/")
    log(f"serve app ready in {time.perf_counter() - started:.0f} s")
    return f"http://127.0.0.1:{port}"


async def send_all(url: str, users: dict, offline: dict, n_requests: int, concurrency: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=ADMIN_TOKEN, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    user_ids = list(users)

    async def one(i: int) -> dict:
        kind = KINDS[i % len(KINDS)]
        user = user_ids[(i // len(KINDS)) % len(user_ids)]
        probe = (i // (len(KINDS) * len(user_ids))) % len(offline["prompts"])
        async with gate:
            started = time.perf_counter()
            try:
                outcome = await ask(client, kind, user, probe, i, users, offline)
            except Exception as exc:  # noqa: BLE001 - counted, named in the results
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            outcome.update(kind=kind, user=user, seconds=time.perf_counter() - started)
            return outcome

    return await asyncio.gather(*(one(i) for i in range(n_requests)))


async def ask(client, kind: str, user: str, probe: int, i: int, users: dict, offline: dict) -> dict:
    from oppu.tasks import get_task

    task = get_task(TASK)
    prompt = offline["prompts"][probe]
    messages = [{"role": "user", "content": prompt}]
    model = f"{MODEL_ID}:{user}"
    expected = offline["answers"][user][probe]
    if kind == "chat_greedy":
        reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0)
        text = reply.choices[0].message.content
        return {"ok": task.parse_output(text) == users[user], "exact": text.strip() == expected.strip(),
                "tokens": reply.usage.completion_tokens, "prompt_tokens": reply.usage.prompt_tokens, "text": text}
    if kind == "chat_stream":
        started, first, pieces, tokens, prompt_tokens = time.perf_counter(), None, [], 0, 0
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first if first is not None else time.perf_counter() - started
                    pieces.append(choice.delta.content)
        text = "".join(pieces)
        return {"ok": task.parse_output(text) == users[user], "exact": text.strip() == expected.strip(),
                "ttft_s": first, "tokens": tokens, "prompt_tokens": prompt_tokens, "text": text}
    if kind == "chat_seeded":
        texts, tokens, prompt_tokens = [], 0, 0
        for _ in range(2):
            reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                         temperature=0.8, top_p=0.9, seed=1000 + i)
            texts.append(reply.choices[0].message.content)
            tokens += reply.usage.completion_tokens
            prompt_tokens += reply.usage.prompt_tokens
        return {"ok": texts[0] == texts[1], "tokens": tokens, "prompt_tokens": prompt_tokens, "text": texts[0]}
    if kind == "completion_stop":
        reply = await client.completions.create(model=model, prompt=f"List three films about {prompt[:40]}:\n1.",
                                                max_tokens=MAX_TOKENS, temperature=0, stop=["\n"])
        choice = reply.choices[0]
        return {"ok": "\n" not in choice.text and choice.finish_reason in ("stop", "length"),
                "tokens": reply.usage.completion_tokens, "prompt_tokens": reply.usage.prompt_tokens, "text": choice.text}
    if kind == "chat_n2":
        reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0.9, n=2, seed=i)
        return {"ok": sorted(c.index for c in reply.choices) == [0, 1], "tokens": reply.usage.completion_tokens,
                "prompt_tokens": reply.usage.prompt_tokens, "text": reply.choices[0].message.content}
    reply = await client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0)
    text = reply.choices[0].message.content
    base_expected = offline["answers"]["base"][probe]
    return {"ok": True, "exact": text.strip() == base_expected.strip(), "tokens": reply.usage.completion_tokens,
            "prompt_tokens": reply.usage.prompt_tokens, "text": text}


def summarise(outcomes: list[dict], load_s: float) -> dict:
    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values = sorted(values)
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    seconds = [o["seconds"] for o in outcomes]
    ttfts = [o["ttft_s"] for o in outcomes if o.get("ttft_s") is not None]
    by_kind = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o["kind"] == kind]
        exact = [o["exact"] for o in mine if "exact" in o]
        by_kind[kind] = {"requests": len(mine), "ok": sum(bool(o.get("ok")) for o in mine),
                         "errors": sorted({o["error"] for o in mine if "error" in o})[:5],
                         "exact_match": f"{sum(exact)}/{len(exact)}" if exact else None,
                         "sample": next((o.get("text") for o in mine if o.get("text")), None)}
    tokens = sum(o.get("tokens") or 0 for o in outcomes)
    prompt_tokens = sum(o.get("prompt_tokens") or 0 for o in outcomes)
    failed = sum(not o.get("ok") for o in outcomes)
    return {"all_ok": failed == 0, "failed": failed, "by_kind": by_kind,
            "latency_ms_p50": pct(seconds, 0.5), "latency_ms_p99": pct(seconds, 0.99),
            "stream_ttft_ms_p50": pct(ttfts, 0.5), "stream_ttft_ms_p99": pct(ttfts, 0.99),
            "load_seconds": round(load_s, 1), "prompt_tokens": prompt_tokens,
            "prompt_tokens_per_s": round(prompt_tokens / load_s, 1) if load_s else None, "completion_tokens": tokens,
            "completion_tokens_per_s": round(tokens / load_s, 1) if load_s else None,
            "mean_latency_ms": round(statistics.fmean(seconds) * 1000, 1) if seconds else None}


if __name__ == "__main__":
    sys.exit(main())
