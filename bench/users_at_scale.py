"""jobs/train_users.py at scale: thousands of users through Ray Data, every adapter checked after.

Builds a synthetic LaMP-2M run with ``--users`` test users (a few base users beside them), a
micro tiny model and its base (Ray Train), then runs ``jobs/train_users.py`` on the local Ray
(per-user trainer by default: the fast one on CPU) and once more (every user must be skipped),
and checks the store: every user exactly one complete version whose files match their sha256. The model is tiny so that the run measures the scheduling (Ray Data
reading users from Parquet, actor pool, batches, publishing, progress), not the GPU math, which
``bench/train_users.py`` measures.

    python3 bench/users_at_scale.py --users 3000 --out /tmp/oppu-scale     # ~15 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = "LaMP-2M"
MICRO_MODEL = ["tiny.hidden_size=32", "tiny.num_layers=1", "tiny.num_heads=2", "tiny.num_kv_heads=2",
               "tiny.intermediate_size=64", "tiny.vocab_size=800", "tiny.pretrain_steps=20"]


def build_run(out: Path, n_users: int, seed: int, overrides: list[str]) -> Path:
    """Synthetic data, prepared data set and config of a run with ``n_users`` test users."""
    from oppu import cli
    from oppu.config import load_config, to_dict
    from oppu.pipeline import PACKAGED_CONFIGS
    from oppu.run_config import RunConfig

    lamp = out / "data" / "lamp"
    base_users = max(50, n_users // 100)
    for argv in (["synth", "--task", TASK, "--users", str(n_users + base_users), "--seed", str(seed),
                  "--n-test", str(n_users), "--queries-per-user", "1", "--out", str(lamp)],
                 ["prepare", "--task", TASK, "--questions", str(lamp / "questions.json"),
                  "--outputs", str(lamp / "outputs.json"), "--n-test", str(n_users), "--out", str(out / "data")]):
        started = time.perf_counter()
        if cli.main(argv) != 0:
            raise SystemExit(f"oppu {argv[0]} failed")
        print(f"[scale] oppu {argv[0]}: {time.perf_counter() - started:.0f}s", flush=True)
    cfg = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", [
        f"task={TASK}", f"run_dir={out}", *MICRO_MODEL, "base.flavours=[plain]", "base.max_samples=256",
        "base.optim.epochs=1", "users.variants=[oppu]", "users.optim.epochs=1", "users.optim.max_length=256",
        # On CPU the per-user trainer is the fast one (300 users: 79 s per-user on 2 actors against
        # 637 s batched, 64 slots); on GPUs: --set users.trainer=batched --set users.users_per_batch=256
        "users.trainer=per-user", "users.users_per_batch=50", "users.actors=2", "ray.num_cpus=2", *overrides])
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return config


def run_job(script: str, config: Path, log: Path) -> float:
    """``python jobs/<script> --config CONFIG`` (a local Ray starts inside it); its wall time."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


def check_store(config: Path) -> dict:
    """Every test user's ``oppu`` adapter: how many versions, and whether the latest verifies."""
    from oppu.config import load_config
    from oppu.data.dataset import read_dataset
    from oppu.models.fingerprint import base_fingerprint
    from oppu.run_config import RunConfig
    from oppu.store import AdapterKey, AdapterStore

    cfg = load_config(RunConfig, config, [])
    users = [u.user_id for u in read_dataset(cfg.data_uri).test_users()]
    store = AdapterStore(cfg.store_uri)
    fingerprint = base_fingerprint(cfg.base_uri("plain"))
    counts: dict[int, int] = {}
    unverified = []
    for user in users:
        key = AdapterKey(TASK, fingerprint, "oppu", user)
        n = len(store.versions(key))
        counts[n] = counts.get(n, 0) + 1
        try:
            store.read_files(key)  # raises unless every file matches its manifest's sha256
        except Exception as error:  # noqa: BLE001 - counted and reported, the check goes on
            unverified.append(f"{user}: {error}")
    return {"test_users": len(users), "users_by_version_count": counts, "unverified": unverified[:20],
            "n_unverified": len(unverified)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="/tmp/oppu-scale")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="run-config key=value")
    parser.add_argument("--results", default=None, help="also write the results JSON here")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    config = build_run(out, args.users, args.seed, args.overrides)
    prepared_s = time.perf_counter() - started
    base_s = run_job("train_base.py", config, out / "train_base.log")
    print(f"[scale] base: {base_s:.0f}s", flush=True)
    users_s = run_job("train_users.py", config, out / "train_users.log")
    print(f"[scale] train_users: {users_s:.0f}s for {args.users} users", flush=True)
    again_s = run_job("train_users.py", config, out / "train_users_again.log")
    print(f"[scale] train_users again (every user skipped): {again_s:.0f}s", flush=True)
    checked = check_store(config)
    summary = [line for line in (out / "train_users.log").read_text().splitlines()
               if "trained " in line and "skipped " in line and "failed " in line]
    results = {"command": "python3 " + " ".join(sys.argv), "users": args.users,
               "model": "micro tiny Llama (hidden 32, 1 layer): scheduling, not GPU math",
               "prepare_s": round(prepared_s, 1), "train_base_s": round(base_s, 1),
               "train_users_s": round(users_s, 1), "users_per_hour": round(args.users * 3600 / users_s),
               "rerun_all_skipped_s": round(again_s, 1), "job_summary": summary[-1:] if summary else None,
               **checked}
    (out / "users_at_scale.json").write_text(json.dumps(results, indent=2))
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    ok = checked["users_by_version_count"] == {1: args.users} and not checked["n_unverified"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
