"""Base-adaptation step time with DeepSpeed ZeRO under Ray Train, on the 7B shape.

One Ray Train ``TorchTrainer`` worker per GPU builds a random-initialised Llama-2-7B-shaped
model in bf16 on its GPU, adds the base stage's LoRA (r=8 on q/k/v/o projections), wraps it in
DeepSpeed with ``oppu.training.deepspeed.deepspeed_config`` and times optimiser steps over
full 2048-token rows. Reports step time, tokens/s and peak GPU memory per stage.

Launch on the GPU machine (device tool):
  source .gpu/activate; python3 bench/train_base.py --stages 2 --out $OUT
CPU check of the config plumbing only (no DeepSpeed step without CUDA):
  python bench/train_base.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oppu.training.deepspeed import deepspeed_config  # noqa: E402


def zero_step_loop(config: dict) -> None:
    """Ray Train worker: build the model, wrap it in DeepSpeed, time ``config['steps']`` steps."""
    import deepspeed
    import peft
    import ray.train
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    shape = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                        attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(shape).to(torch.bfloat16)
    lora = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peft.get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_config = deepspeed_config(config["stage"], bf16=True, micro_batch=config["micro_batch"], max_grad_norm=0.3,
                                 warmup_steps=1, total_steps=1000)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    engine.train()
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.randint(3, 32000, (config["micro_batch"], config["seq_len"]), device=device, generator=generator)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(config["warmup"] + config["steps"]):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(input_ids=rows, labels=rows).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step >= config["warmup"]:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    world = ray.train.get_context().get_world_size()
    metrics = {"step_s_median": step_s, "step_s_all": times,
               "tokens_per_s": world * config["micro_batch"] * config["seq_len"] / step_s,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
               "loss": float(loss.detach()), "world_size": world}
    # Ray Train 2.x (Train V2) keeps only metrics reported with a checkpoint in ``Result.metrics``:
    # rank 0 also writes them where the driver reads them.
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["metrics_path"]).write_text(json.dumps(metrics))
    ray.train.report({"step_s_median": step_s, "step_s_all": times,
                      "tokens_per_s": world * config["micro_batch"] * config["seq_len"] / step_s,
                      "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "loss": float(loss.detach()), "world_size": world})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="2", help="comma list of ZeRO stages (2, 3)")
    parser.add_argument("--workers", type=int, default=1, help="GPUs (one Ray Train worker each)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the DeepSpeed configs and exit")
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    if args.dry_run:
        for stage in stages:
            print(json.dumps(deepspeed_config(stage, micro_batch=args.micro_batch, max_grad_norm=0.3), indent=2))
        return 0

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init()
    results = {"command": "python3 " + " ".join(sys.argv), "model": "random-init Llama-2-7B shape, bf16, "
               "LoRA r=8 on q/k/v/o", "rows": f"{args.micro_batch} x {args.seq_len} tokens per step and GPU",
               "stages": {}}
    for stage in stages:
        started = time.perf_counter()
        Path(f"/tmp/oppu-bench-zero{stage}.json").unlink(missing_ok=True)  # one machine: rank 0 writes it here
        trainer = TorchTrainer(
            zero_step_loop,
            train_loop_config={"stage": stage, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                               "steps": args.steps, "warmup": args.warmup,
                               "metrics_path": f"/tmp/oppu-bench-zero{stage}.json"},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=True),
            run_config=RunConfig(name=f"bench-zero{stage}", storage_path="/tmp/ray-bench"))
        result = trainer.fit()
        if result.error:
            raise SystemExit(f"ZeRO-{stage} failed: {result.error}")
        metrics = json.loads(Path(f"/tmp/oppu-bench-zero{stage}.json").read_text())
        metrics["wall_s_including_setup"] = time.perf_counter() - started
        results["stages"][f"zero{stage}"] = metrics
        print(f"[train_base] ZeRO-{stage}: {json.dumps(metrics)}", flush=True)
    import torch

    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_base.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
