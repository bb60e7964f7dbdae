"""Incremental update after a behaviour shift (issue #17 part 3): no update, full retrain, incremental.

    nice -n 5 python bench/lifecycle.py --seeds 0 1 2 3 4

For each seed, on CPU with a small tiny default model:

1. ``oppu synth`` LaMP-2M with ``--shift-at``: every user takes up another persona's taste at a
   known item of their history (``reference.json``); the queries come after the shift.
2. ``oppu prepare``; each test user keeps only the history before their shift. The plain base is
   adapted (``oppu train-base``'s stage, through Ray Train) from a tiny model pretrained once for
   every seed (on the text of another synthetic world, seed ``PRETRAIN_SEED``: one stand-in
   pretrained LLM, as a real run has one), and each test user's adapter trained on that pre-shift
   history (``users.update`` plays no part: nobody has an adapter yet).
3. The post-shift items are added as ``oppu users add`` adds them (``add_user_history``), and the
   store copied into three arms: **no update** (the pre-shift adapters), **full** (retrained from
   scratch on the whole history, ``users.update=full``) and **incremental** (the pre-shift adapter
   continued on the new items plus a replay sample, ``users.update=incremental``). Training runs
   in this process through the train_users job's own actor class (``PersonalTrainer``: the skip
   check, samples, ``AdapterPublisher.train_and_publish``), without the Ray pool around it.
4. Each arm answers the test users' queries through the evaluation job's own actor class
   (``QueryAnswerer``, method ``oppu``); accuracy after the shift, and what the update cost:
   tokens processed (prompt and target, every epoch) and training seconds, summed over users.
   Torch runs one thread, as in a train_users actor (``users.num_cpus_per_actor: 1``); on this
   shared 2-core machine two threads made the same training 2 to 70 times slower under load.

Goal (issue #17): incremental reaches >= 90% of the full retrain's accuracy gain over no update
at <= 25% of its training tokens. ``TUNING_SEEDS`` are the seeds the incremental settings were
chosen on; rows say which. Writes ``bench/results/lifecycle.json`` (a seed's row replaces that
seed's earlier one; other seeds' rows stay) and prints one JSON line per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

TASK = "LaMP-2M"
TUNING_SEEDS = (0,)  # users.incremental's defaults (replay_ratio, epochs) were chosen on seed 0
PRETRAIN_SEED = 1000  # the world whose text pretrains the tiny model every seed starts from
ARMS = ("no-update", "full", "incremental")
# A smaller tiny model than the quickstart's (128 wide, 2 layers: about half its cost), the
# quickstart's base adaptation and personal LoRA otherwise (oppu/configs/quickstart.yaml).
SETTINGS = [
    "tiny.hidden_size=128", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=2",
    "tiny.intermediate_size=384", "tiny.pretrain_steps=100", "tiny.num_threads=1",
    "base.flavours=[plain]", "base.num_workers=1", "base.max_samples=400", "users.variants=[oppu]",
    "eval.max_prompt_tokens=512", "ray.num_cpus=2",
    # 4 of a full retrain's 5 epochs, with users.incremental.replay_ratio's default 0.25: chosen on
    # seed 0 (accuracy after the shift, share of the full retrain's tokens: 5 epochs 0.59 at 0.250,
    # right at the bar; 4 epochs 0.55 at 0.20; 3 epochs 0.53 at 0.15; replay 0.5 x 4 epochs 0.58 at
    # 0.24; no replay 0.62 at 0.20; the full retrain 0.43, no update 0.05)
    "users.incremental.epochs=4",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help=f"data and training seeds (the incremental settings were tuned on {TUNING_SEEDS})")
    parser.add_argument("--users", type=int, default=32, help="synthetic users")
    parser.add_argument("--test-users", type=int, default=6, help="of whom test users (the most active)")
    parser.add_argument("--queries", type=int, default=20, help="queries per user, all after the shift")
    parser.add_argument("--shift-at", type=float, default=0.8, help="where in each history the shift falls")
    parser.add_argument("--max-history", type=int, default=60, help="longest history a user has")
    parser.add_argument("--out", default="runs/lifecycle", help="run directories, one per seed")
    parser.add_argument("--results", default="bench/results/lifecycle.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override (repeatable), e.g. users.incremental.replay_ratio=1")
    args = parser.parse_args()
    args.out = str(Path(args.out).resolve())  # Ray Train's workers run elsewhere: paths are absolute
    import torch

    from oppu import logs

    logs.configure()
    torch.set_num_threads(1)
    pretrained = pretrain(args)
    rows = []
    for seed in args.seeds:
        row = run_seed(args, seed, pretrained)
        print(json.dumps({k: row[k] for k in ("seed", "tuning_seed", "arms", "goals")}), flush=True)
        rows.append(row)
    write_results(Path(args.results), "nice -n 5 python " + " ".join(sys.argv), rows)
    return 0


def pretrain(args) -> Path:
    """The tiny model every seed's base is adapted from, pretrained on the text of the users of
    the world ``PRETRAIN_SEED`` (cached in ``$OPPU_CACHE_DIR/tiny`` across runs)."""
    from oppu.config import load_config
    from oppu.data.lamp_io import read_lamp
    from oppu.data.synth import generate
    from oppu.models import build_tiny_base
    from oppu.run_config import RunConfig
    from oppu.tasks import get_task
    from oppu.training.samples import pretraining_corpus

    paths = generate(TASK, args.users, PRETRAIN_SEED, Path(args.out) / "pretrain-world", args.test_users,
                     queries_per_user=args.queries, activity=_activity(args), shift_at=args.shift_at)
    users = read_lamp(get_task(TASK), paths.questions, paths.outputs)
    tiny = load_config(RunConfig, None, [f"task={TASK}", *[s for s in SETTINGS if s.startswith("tiny.")]]).tiny
    return build_tiny_base(pretraining_corpus(get_task(TASK), users), Path(args.out) / "pretrained", tiny,
                           PRETRAIN_SEED)


def run_seed(args, seed: int, pretrained: Path) -> dict:
    import ray

    from oppu import cli
    from oppu.config import load_config
    from oppu.data.dataset import read_dataset, write_dataset
    from oppu.data.synth import generate
    from oppu.pipeline import PACKAGED_CONFIGS, run_stages
    from oppu.run_config import RunConfig

    started = time.perf_counter()
    run_dir = Path(args.out) / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    lamp = run_dir / "data" / "lamp"
    paths = generate(TASK, args.users, seed, lamp, args.test_users, queries_per_user=args.queries,
                     activity=_activity(args), shift_at=args.shift_at)
    reference = json.loads(paths.reference.read_text())
    assert cli.main(["prepare", "--task", TASK, "--questions", str(paths.questions), "--outputs",
                     str(paths.outputs), "--n-test", str(args.test_users), "--out", str(run_dir / "data")]) == 0
    dataset = read_dataset(run_dir / "data")
    later: dict[str, list] = {}  # each test user's post-shift items, to be added as `oppu users add` does
    users = []
    for user in dataset.users:
        if user.role == "test":
            before = reference["users"][user.user_id]["shift"]["items_before"]
            later[user.user_id] = user.history[before:]
            user = dataclasses.replace(user, history=user.history[:before], queries=[
                dataclasses.replace(q, visible_history=min(q.visible_history, before)) for q in user.queries])
        users.append(user)
    write_dataset(run_dir / "data", TASK, users, dataset.meta)

    overrides = [f"task={TASK}", f"run_dir={run_dir}", f"seed={seed}", f"model={pretrained}", *SETTINGS, *args.set]
    cfg = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", overrides)
    # Ray of our own (not another process's cluster on this machine) for the base adaptation only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=f"/tmp/ray-lifecycle-{os.getpid()}")
    try:
        run_stages(cfg, ["base"])
    finally:
        ray.shutdown()
    base_s = time.perf_counter() - started

    test_users = [u for u in users if u.role == "test"]
    initial = train(cfg, "full", test_users)
    stores = {arm: run_dir / f"adapters-{arm}" for arm in ARMS}
    for arm in ARMS:
        shutil.copytree(cfg.store_uri, stores[arm])
    add_post_shift_items(run_dir, later)
    updated = [read_dataset(run_dir / "data").user(u.user_id) for u in test_users]
    arms = {"no-update": {"tokens": 0, "target_tokens": 0, "seconds": 0.0, "samples": 0}}
    for arm in ("full", "incremental"):
        arms[arm] = train(dataclasses.replace(cfg, store=str(stores[arm])), arm, updated)
    for arm in ARMS:
        arms[arm].update(answer(dataclasses.replace(cfg, store=str(stores[arm])), "oppu", updated))
    no_adapter = answer(cfg, "non-personalized", updated)

    full, incremental, none = arms["full"], arms["incremental"], arms["no-update"]
    gain_full = full["accuracy"] - none["accuracy"]
    gain_inc = incremental["accuracy"] - none["accuracy"]
    token_share = incremental["tokens"] / full["tokens"]
    goals = {"incremental_gain_of_full_gain": round(gain_inc / gain_full, 4) if gain_full else None,
             "incremental_tokens_of_full_tokens": round(token_share, 4),
             "incremental_seconds_of_full_seconds": round(incremental["seconds"] / full["seconds"], 4),
             "met": bool(gain_full > 0 and gain_inc >= 0.9 * gain_full and token_share <= 0.25)}
    n_before = sum(len(u.history) for u in test_users)
    return {
        "seed": seed, "tuning_seed": seed in TUNING_SEEDS,
        "world": {"task": TASK, "users": args.users, "test_users": len(test_users), "shift_at": args.shift_at,
                  "max_history": args.max_history, "queries": sum(len(u.queries) for u in updated),
                  "items_before_shift": n_before, "items_after_shift": sum(len(v) for v in later.values())},
        "settings": {"users": {"peft": dataclasses.asdict(cfg.users.peft), "optim": dataclasses.asdict(cfg.users.optim),
                               "incremental": dataclasses.asdict(cfg.users.incremental)},
                     "overrides": [*SETTINGS, *args.set]},
        "arms": arms, "initial_training": initial,
        "reference": {"non-personalized": no_adapter["accuracy"],
                      **{name: reference[name]["accuracy"] for name in ("population", "bayes")}},
        "goals": goals, "base_seconds": round(base_s, 1), "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _activity(args):
    from oppu.data.synth import ActivitySettings

    return ActivitySettings(max_history=args.max_history, min_test_history=min(40, args.max_history))


def train(cfg, update: str, users: list) -> dict:
    """Train every one of ``users`` with ``users.update=update`` through the train_users actor
    class, in this process; what it cost, summed over users."""
    from oppu.training.users_actor import PersonalTrainer

    cfg = dataclasses.replace(cfg, users=dataclasses.replace(cfg.users, update=update))
    trainer = PersonalTrainer(cfg, "oppu")
    out = trainer(_batch(users))
    assert list(out["status"]) == ["trained"] * len(users), out
    target_tokens = 0
    for user in users:
        target_tokens += trainer.publisher.store.latest(trainer.publisher.key(user.user_id)).metrics["tokens"]
        if update == "incremental":
            assert trainer.publisher.store.latest(trainer.publisher.key(user.user_id)).trainer == "per-user+incremental"
    return {"tokens": int(sum(out["tokens"])), "target_tokens": int(target_tokens),
            "seconds": round(float(sum(out["seconds"])), 2), "samples": int(sum(out["samples"]))}


def add_post_shift_items(run_dir: Path, later: dict[str, list]) -> None:
    """Each user's post-shift items, written as `oppu users add --history FILE` takes them, added so."""
    from oppu.user_history import add_user_history

    for user_id, items in later.items():
        path = run_dir / f"later-{user_id}.json"
        path.write_text(json.dumps([{"id": item.id, **item.fields, "date": item.date} for item in items]))
        add_user_history(str(run_dir / "data"), str(run_dir / "adapters"), user_id, path)


def answer(cfg, method: str, users: list) -> dict:
    """``method``'s accuracy on ``users``' queries, answered by the evaluation job's actor class."""
    from oppu.evaluation.runner import QueryAnswerer
    from oppu.tasks import get_task

    out = QueryAnswerer(cfg, [method], {})(_batch(users))
    assert not any(out["error"]), out["error"]
    gold = {q.id: q.gold for u in users for q in u.queries}
    scores = get_task(cfg.task).score([gold[q] for q in out["query_id"]], out["prediction"])
    return {name: round(value, 4) for name, value in scores.items()}


def _batch(users: list) -> dict:
    """What Ray Data hands an actor: columns of users.parquet rows."""
    import numpy as np

    rows = [u.to_row() for u in users]
    return {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}


def device() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads"


def write_results(path: Path, command: str, rows: list[dict]) -> None:
    """Add ``rows`` to the results file, replacing earlier rows of the same seed; ``summary`` is
    over every row kept, and over the rows of seeds the settings were not tuned on."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    fresh = {row["seed"] for row in rows}
    stamp = {"command": command, "device": device(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
             "load_average_1m": round(os.getloadavg()[0], 1)}
    rows = [{**row, **stamp} for row in rows]
    runs = sorted([*[r for r in earlier.get("runs", []) if r["seed"] not in fresh], *rows], key=lambda r: r["seed"])
    commands = list(dict.fromkeys([*earlier.get("commands", []), command]))
    out = {"bench": "lifecycle", "task": TASK, "goal": "incremental: >= 0.9 of the full retrain's accuracy gain "
           "over no update, at <= 0.25 of its training tokens", "tuning_seeds": list(TUNING_SEEDS),
           "commands": commands, "summary": {"all_seeds": summary(runs),
                                             "other_seeds": summary([r for r in runs if not r["tuning_seed"]])},
           "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def summary(runs: list[dict]) -> dict:
    """Pooled over seeds: accuracies averaged, tokens and seconds summed, the goal ratios of those."""
    if not runs:
        return {}
    mean = {arm: round(sum(r["arms"][arm]["accuracy"] for r in runs) / len(runs), 4) for arm in ARMS}
    tokens = {arm: sum(r["arms"][arm]["tokens"] for r in runs) for arm in ARMS}
    gain_full, gain_inc = mean["full"] - mean["no-update"], mean["incremental"] - mean["no-update"]
    return {"seeds": [r["seed"] for r in runs], "accuracy": mean,
            "incremental_gain_of_full_gain": round(gain_inc / gain_full, 4) if gain_full else None,
            "incremental_tokens_of_full_tokens": round(tokens["incremental"] / tokens["full"], 4),
            "seeds_meeting_goal": sum(r["goals"]["met"] for r in runs)}


if __name__ == "__main__":
    sys.exit(main())
