"""Check the quality bars of the embedded default over several seeds (CPU; CI does not run this).

    python bench/quality.py --seeds 2 3 4 --tasks LaMP-2M LaMP-3 LaMP-5 --out runs/quality

For each (task, seed) it runs ``oppu quickstart --task T --seed S --out OUT/T-seedS --fresh`` (the
run directory is deleted first, so no stage of an earlier run is reused) and checks: OPPU closes
at least half the gap between non-personalized and the Bayes-optimal reference (classification:
accuracy; rating: MAE), RAG k=1 + OPPU is at least as good as RAG k=1, and on generation tasks
OPPU's ROUGE-1 beats non-personalized. Each row carries the population reference (the best answer
that ignores the user) where the data has one, and ``tuning_seed``: seeds 0-7 are the ones
the quickstart's settings were tuned on or looked at (README), so only other seeds test them. Writes
``bench/results/quality.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TUNING_SEEDS = tuple(range(8))  # the personal LoRA and base lr were chosen on 0-1; 2-4 were looked at, and
# 3 (pretraining length) and 5-7 (its untuned check, which decided to keep 200 steps) used: seeds from 8 on are new


def bars(metrics: dict) -> dict:
    methods, reference = metrics["methods"], metrics.get("reference", {})
    metric = next(iter(methods["oppu"]))
    higher = metric not in ("MAE", "RMSE")

    def at_least(a: float, b: float) -> bool:
        return a >= b if higher else a <= b

    out = {"metric": metric, "non-personalized": methods["non-personalized"][metric],
           "oppu": methods["oppu"][metric], "rag-k1": methods["rag-k1"][metric],
           "rag-k1+oppu": methods["rag-k1+oppu"][metric],
           "rag_oppu_at_least_rag": at_least(methods["rag-k1+oppu"][metric], methods["rag-k1"][metric])}
    if "population" in reference:
        out["population"] = reference["population"][metric]
        out["oppu_beats_population"] = out["oppu"] > out["population"] if higher else out["oppu"] < out["population"]
    if metric.startswith("rouge"):
        out["oppu_beats_non_personalized"] = out["oppu"] > out["non-personalized"]
    elif "bayes" in reference:
        out["bayes"] = reference["bayes"][metric]
        out["gap_closed"] = metrics.get("oppu_gap_closed")
        out["closes_half_the_gap"] = out["gap_closed"] is not None and out["gap_closed"] >= 0.5
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[8, 9, 10],
                        help=f"seeds to run (the settings were tuned on {TUNING_SEEDS}; rows say which)")
    parser.add_argument("--tasks", nargs="+", default=["LaMP-2M", "LaMP-3", "LaMP-5"])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--results", default="bench/results/quality.json")
    parser.add_argument("--collect", action="store_true",
                        help="only read the metrics.json of runs already in --out (e.g. run one by one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override passed to every quickstart (repeatable)")
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            run_dir = Path(args.out) / f"{task}-seed{seed}"
            started = time.perf_counter()
            if args.collect:
                if not (run_dir / "metrics.json").exists():
                    rows.append({"task": task, "seed": seed, "error": "no metrics.json"})
                    continue
                metrics = json.loads((run_dir / "metrics.json").read_text())
                rows.append({"task": task, "seed": seed, "tuning_seed": seed in TUNING_SEEDS, **bars(metrics)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            overrides = [arg for kv in args.set for arg in ("--set", kv)]
            done = subprocess.run(["oppu", "quickstart", "--task", task, "--seed", str(seed),
                                   "--out", str(run_dir), "--fresh", *overrides], capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                rows.append({"task": task, "seed": seed, "error": done.returncode})
                continue
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append({"task": task, "seed": seed, "tuning_seed": seed in TUNING_SEEDS,
                         "seconds": round(time.perf_counter() - started), **bars(metrics)})
            print(json.dumps(rows[-1]), flush=True)
    write_results(Path(args.results), " ".join(sys.argv), rows)
    return 0


def write_results(path: Path, command: str, rows: list[dict]) -> None:
    """Add ``rows`` to the results file, replacing earlier rows of the same (task, seed): runs of
    other seeds, made by earlier commands, stay, and ``commands`` lists every command that wrote one."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    fresh = {(row["task"], row["seed"]) for row in rows}
    kept = [row for row in earlier.get("runs", []) if (row["task"], row["seed"]) not in fresh]
    commands = [c for c in [*earlier.get("commands", [earlier.get("command")] if earlier.get("command") else []),
                            command] if c]
    runs = sorted([*kept, *rows], key=lambda row: (row["task"], row["seed"]))
    out = {"command": command, "commands": list(dict.fromkeys(commands)), "tuning_seeds": list(TUNING_SEEDS),
           **{k: v for k, v in earlier.items() if k not in ("command", "commands", "runs", "tuning_seeds")},
           "runs": runs}
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
