"""The paper's Table 1 with a real pretrained LLM, at paper scale, on one GPU, through the jobs' stages.

    python3 bench/table1_real.py --task LaMP-2M --seed 0 --out /tmp/table1          # everything
    python3 bench/table1_real.py ... --stages data base       # then: --stages users evaluate

Synthetic LaMP data (1,100 users; the 100 with the longest histories are the test users, the
rest adapt the bases), every base of ``oppu/configs/table1-real.yaml`` adapted with Ray Train +
DeepSpeed ZeRO-2 (``jobs/train_base.py``'s stage), the six personal variants trained with the
batched trainer (``jobs/train_users.py``'s), the 13 methods evaluated (``jobs/evaluate.py``'s).
A stage already done in ``--out`` is reused (bases whose provenance matches, adapters whose data
and config match), so the table can be built over several calls of at most 10 minutes each;
``device_seconds`` adds up the wall time of every stage that did work, in every call.

When ``evaluate`` has run, the run's record is added to ``--results`` (default
``bench/results/table1_real.json``, replacing an earlier record of the same task and seed) and,
when ``$OUT`` is set, copied there. Shape: ``{"device", "command", "model", "tuning_seeds",
"runs": [{"task", "seed", "command", "methods", "reference", "population_gap_closed", "device_seconds",
"stage_seconds", "decoding"}]}``; with ``--compare-decoding`` a run also holds ``other_decoding``: the
same bases and adapters evaluated with the other ``eval.decoding`` in the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

STAGES = ("data", "base", "users", "evaluate")
TABLE1_METHODS = ("non-personalized", "random-history", "rag-k1", "rag-k2", "rag-k4", "pag", "pag+rag-k1",
                  "oppu", "rag-k1+oppu", "rag-k2+oppu", "rag-k4+oppu", "pag+oppu", "pag+rag-k1+oppu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="LaMP-2M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--users", type=int, default=1100, help="users in all (default 1,100)")
    parser.add_argument("--n-test", type=int, default=100, help="test users (default 100, as the paper)")
    parser.add_argument("--out", required=True, help="run directory (reused across calls)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--tuning-seeds", type=int, nargs="*", default=[0],
                        help="seeds the settings were tuned on (recorded in the results)")
    parser.add_argument("--results", default="bench/results/table1_real.json")
    parser.add_argument("--config", default=None, help="run config (default oppu/configs/table1-real.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--compare-decoding", action="store_true",
                        help="before evaluate, evaluate the same bases and adapters with the other "
                             "eval.decoding (greedy / labels) and record its scores beside the run's "
                             "(its seconds are recorded apart, not in device_seconds)")
    args = parser.parse_args()

    from oppu.config import load_config, to_dict
    from oppu.pipeline import PACKAGED_CONFIGS, _timestamped_log, run_stages
    from oppu.run_config import RunConfig
    from oppu.tasks import get_task

    task = get_task(args.task)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(RunConfig, args.config or PACKAGED_CONFIGS / "table1-real.yaml",
                      [f"task={task.name}", f"run_dir={out}", f"seed={args.seed}", f"model={args.model}",
                       *args.overrides])
    log = _timestamped_log()
    compared = None
    times_path = out / "bench-stage-seconds.json"
    stage_seconds = json.loads(times_path.read_text()) if times_path.exists() else {}
    # A call cut off by its time limit (``timeout`` sends SIGTERM) still records the seconds its
    # stage ran, so device_seconds counts every call's work, finished or not.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for stage in STAGES:
        if stage not in args.stages:
            continue
        started = time.perf_counter()
        did_work = True
        try:
            if stage == "data":
                did_work = make_data(task.name, args, out, log)
            elif stage == "evaluate" and args.compare_decoding:
                compared = evaluate_other_decoding(cfg, log)
                started = time.perf_counter()
                run_stages(cfg, [stage], log)
            else:
                run_stages(cfg, [stage], log)
        finally:
            if did_work:
                stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - started
                times_path.write_text(json.dumps(stage_seconds, indent=1))
                log(f"[table1] {stage} took {time.perf_counter() - started:.0f}s")
    if "evaluate" in args.stages:
        record(args, cfg, to_dict(cfg), stage_seconds, log, compared)
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def make_data(task: str, args, out: Path, log) -> bool:
    """Generate and prepare the synthetic data set once; False when it was already there."""
    from oppu import cli

    lamp_dir, data_dir = out / "data" / "lamp", out / "data"
    if (data_dir / "dataset.json").exists():
        log(f"[table1] reusing the data in {data_dir}")
        return False
    log(f"[table1] generating {args.users} synthetic {task} users ({args.n_test} test)")
    for argv in (["synth", "--task", task, "--users", str(args.users), "--seed", str(args.seed),
                  "--n-test", str(args.n_test), "--out", str(lamp_dir)],
                 ["prepare", "--task", task, "--questions", str(lamp_dir / "questions.json"),
                  "--outputs", str(lamp_dir / "outputs.json"), "--n-test", str(args.n_test),
                  "--out", str(data_dir)]):
        if cli.main(argv):
            raise SystemExit(f"oppu {argv[0]} failed")
    shutil.copyfile(lamp_dir / "reference.json", data_dir / "reference.json")
    return True


def evaluate_other_decoding(cfg, log) -> dict:
    """The evaluate stage with the other ``eval.decoding`` on the same bases and adapters: its
    methods' scores, population gap shares and seconds (the run's own evaluation then overwrites
    its files)."""
    import dataclasses

    from oppu.pipeline import run_stages

    other = "greedy" if cfg.eval.decoding == "labels" else "labels"
    started = time.perf_counter()
    run_stages(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, decoding=other)), ["evaluate"], log)
    seconds = time.perf_counter() - started
    log(f"[table1] evaluate with decoding={other} (for comparison) took {seconds:.0f}s")
    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    return {"decoding": other, "methods": metrics["methods"],
            "population_gap_closed": metrics.get("population_gap_closed"), "evaluate_seconds": round(seconds, 1)}


def record(args, cfg, config: dict, stage_seconds: dict, log, compared: dict | None = None) -> None:
    import torch

    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    results_path = Path(args.results)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    command = "python3 bench/table1_real.py " + " ".join(sys.argv[1:])
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("device") != device or results.get("model") != args.model:
        results = {}  # records of another device or model are not mixed into one file
    # The top-level command is the latest call's; each run keeps the call that evaluated it.
    run = {"task": metrics["task"], "seed": args.seed, "command": command, "methods": metrics["methods"],
           "reference": metrics["reference"], "population_gap_closed": metrics.get("population_gap_closed"),
           "non_personalized_gap_closed": metrics.get("oppu_gap_closed"),
           "n_test_users": metrics["n_test_users"], "n_queries": metrics["n_queries"],
           "errors": metrics.get("errors", {}),
           "device_seconds": round(sum(stage_seconds.values()), 1),
           "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()}, "config": config,
           "decoding": metrics.get("decoding", cfg.eval.decoding)}  # greedy for a task without labels
    if compared is not None:
        run["other_decoding"] = compared
    runs = [r for r in results.get("runs", []) if (r["task"], r["seed"]) != (run["task"], run["seed"])]
    results = {"device": device, "command": command, "model": args.model,
               "tuning_seeds": sorted(set(results.get("tuning_seeds", [])) | set(args.tuning_seeds)),
               "runs": sorted([*runs, run], key=lambda r: (r["task"], r["seed"]))}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    if os.environ.get("OUT"):  # the GPU machine sends back what lies under $OUT
        for source in (results_path, Path(cfg.run_dir) / "metrics.md"):
            target = Path(os.environ["OUT"]) / source.name
            if target.resolve() != source.resolve():
                shutil.copy(source, target)
    print((Path(cfg.run_dir) / "metrics.md").read_text())
    log(f"[table1] {run['task']} seed {args.seed}: {run['device_seconds']:.0f}s of device time "
        f"({run['stage_seconds']}); wrote {results_path}")


if __name__ == "__main__":
    sys.exit(main())
