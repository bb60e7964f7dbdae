"""Base adaptation of several flavours: one Ray Train run for all of them against a run per flavour.

    source .gpu/activate; python3 bench/base_one_run.py --out /tmp/base-one-run --results $OUT/base_one_run.json

Synthetic LaMP-2M data; ``oppu/configs/table1-real.yaml``'s base stage (DeepSpeed ZeRO-2 on one GPU,
LoRA r=16 on every linear layer, batch 80, max length 512) over a model of SmolLM2-135M's shape
(30 layers x 576, 9 heads, 3 KV heads, MLP 1536; the tiny model's builder with its tokenizer, one
pretraining step: the weights do not matter for the time). The flavours are adapted once by
``adapt_bases`` (one run), then again by ``adapt_base`` per flavour (a run each, as before), into
two run dirs. Each side's wall time, and per flavour the seconds the worker recorded in
``oppu-base-train.json`` (set-up, engine init, train, merge+save), go to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_SHAPE = ["tiny.hidden_size=576", "tiny.num_layers=30", "tiny.num_heads=9", "tiny.num_kv_heads=3",
                 "tiny.intermediate_size=1536", "tiny.pretrain_steps=1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="scratch directory")
    parser.add_argument("--flavours", default="plain,rag-k1,rag-k2")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--max-samples", type=int, default=1600, help="per flavour: 20 steps of 80 an epoch")
    parser.add_argument("--results", default=None, help="JSON file to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from oppu import cli
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS, _timestamped_log, ensure_pretrained, init_ray
    from oppu.run_config import RunConfig
    from oppu.training.base import BASE_TRAIN_STATS, adapt_base, adapt_bases

    out = Path(args.out).resolve()
    flavours = args.flavours.split(",")
    log = _timestamped_log()
    lamp = out / "lamp"
    for argv in (["synth", "--task", "LaMP-2M", "--users", str(args.users), "--seed", "0", "--n-test", "20",
                  "--out", str(lamp)],
                 ["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                  "--outputs", str(lamp / "outputs.json"), "--n-test", "20", "--out", str(out / "data")]):
        if cli.main(argv):
            raise SystemExit(f"oppu {argv[0]} failed")

    def config(run_dir: Path, model: str) -> RunConfig:
        return load_config(RunConfig, PACKAGED_CONFIGS / "table1-real.yaml", [
            "task=LaMP-2M", f"run_dir={run_dir}", f"data={out / 'data'}", f"model={model}", *SMOLLM2_SHAPE,
            f"base.flavours=[{','.join(flavours)}]", f"base.max_samples={args.max_samples}", "base.optim.epochs=1",
            *args.overrides])

    model = ensure_pretrained(config(out / "model", "tiny"))
    one, apart = config(out / "one-run", model), config(out / "run-per-flavour", model)
    init_ray(one)
    started = time.perf_counter()
    adapt_bases(one, flavours, log)
    one_s = time.perf_counter() - started
    started = time.perf_counter()
    for flavour in flavours:
        adapt_base(apart, flavour, log)
    apart_s = time.perf_counter() - started
    log(f"[bench] {len(flavours)} flavours: one run {one_s:.0f}s, a run per flavour {apart_s:.0f}s")

    import torch

    stats = {name: {f: json.loads(Path(cfg.base_uri(f), BASE_TRAIN_STATS).read_text()) for f in flavours}
             for name, cfg in (("one_run", one), ("run_per_flavour", apart))}
    results = {"command": "python3 " + " ".join(sys.argv),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "model": "SmolLM2-135M shape (tiny builder), table1-real.yaml base settings, 1 epoch",
               "flavours": flavours, "samples_per_flavour": args.max_samples,
               "one_run_s": round(one_s, 1), "run_per_flavour_s": round(apart_s, 1), "worker_seconds": stats}
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
