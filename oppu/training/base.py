"""Task adaptation of the base LLM (paper section 2.2): LoRA on the non-test users, merged in.

``train_base_loop`` is the Ray Train worker function; it depends only on its ``config`` dict.
``adapt_base`` is what ``jobs/train_base.py`` runs on the driver: it builds the samples, starts a
``TorchTrainer`` (DDP on CPU, DeepSpeed ZeRO when a DeepSpeed config is given on GPU), and
publishes the merged model of rank 0's final checkpoint as ``run_dir/base[-flavour]``.

Checkpoints come in two kinds: resumable ones every ``base.checkpoint_every_steps`` steps and at the
end of every epoch but the last (``base.checkpoint_each_epoch``; marked by ``TRAIN_STATE``), and
the final one, the merged model (marked by ``BASE_PROVENANCE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from oppu import fsutil
from oppu.errors import ConfigError, OppuError
from oppu.run_config import OptimSettings, PeftSettings, RunConfig, parse_flavour

logger = logging.getLogger(__name__)

TRAIN_STATE = "oppu-train-state.json"  # a resumable checkpoint's position (TrainPosition)
BASE_PROVENANCE = "oppu-base.json"  # a merged base: what it was adapted from


def train_base_loop(config: dict) -> None:
    """Ray Train worker: LoRA-train the base on this worker's shard, merge, report the model.

    Every ``checkpoint_every_steps`` optimiser steps it reports a resumable checkpoint (the
    trainable weights, optimiser and schedule state, RNG state, step and data position); started
    again by Ray Train after a failure, it resumes from the latest one, skipping the batches done.
    """
    import peft as peft_lib
    import ray.train
    import ray.train.torch
    import torch
    from transformers import get_linear_schedule_with_warmup

    from oppu.models import encode_sample, load_model
    from oppu.models.prompting import resolve_prompt_format
    from oppu.models.samples import collate, target_loss
    from oppu.tasks.base import TrainingSample

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    resume = ray.train.get_checkpoint()
    if resume is not None and _is_final(resume):
        _report_final_again(resume, config, rank)
        return
    optim = OptimSettings(**config["optim"])
    peft_settings = PeftSettings(**config["peft"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    model, tokenizer = load_model(config["model"], device=str(device))
    prompt_format = resolve_prompt_format(config["prompt_format"], tokenizer)
    torch.manual_seed(config["seed"])
    model = peft_lib.get_peft_model(model, peft_settings.to_peft_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = max(1, math.ceil(config["n_samples"] / (optim.batch_size * world)))
    total_steps = steps_per_epoch * config["epochs"]

    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(optim.warmup_ratio * total_steps), total_steps)
    engine = None
    if config.get("deepspeed"):
        import deepspeed

        # base.optim rules under DeepSpeed too: the JSON's own optimizer and scheduler sections
        # would silently replace its lr, weight decay, warmup and decay, so they are dropped.
        ds_config = {k: v for k, v in config["deepspeed"].items() if k not in ("optimizer", "scheduler")}
        ds_config.setdefault("train_micro_batch_size_per_gpu", optim.batch_size)
        ds_config.setdefault("gradient_clipping", optim.max_grad_norm)
        ds_config["zero_allow_untested_optimizer"] = True  # torch's AdamW, as on the DDP path
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    position = TrainPosition()
    if resume is not None:
        with resume.as_directory() as resume_dir:
            position = _load_train_state(Path(resume_dir), rank, model, optimizer, scheduler, engine)
        logger.warning("rank %d resumes base training at step %d (epoch %d, %d batches done) from %s",
                       rank, position.step, position.epoch + 1, position.batches_done, resume.path)
    if engine is not None:
        train_model = engine
    else:
        train_model = ray.train.torch.prepare_model(model) if world > 1 else model

    shard = ray.train.get_dataset_shard("train")
    train_model.train()
    step, resumed_from = position.step, position.step
    every = config["checkpoint_every_steps"]  # the final step reports the merged model instead
    checkpointed_at = step  # the step of the last resumable checkpoint (or of the one resumed from)
    for epoch in range(position.epoch, config["epochs"]):
        started, tokens, losses = time.perf_counter(), 0, []
        skip = position.batches_done if epoch == position.epoch else 0
        batches_done = 0
        # Where a step's time goes (waiting on the data shard / tokenizing / the model step /
        # writing checkpoints), so a slow base run says which part to fix.
        seconds = {"data": 0.0, "encode": 0.0, "step": 0.0, "first_step": 0.0, "checkpoint": 0.0}
        mark = time.perf_counter()
        for rows in shard.iter_batches(batch_size=optim.batch_size, batch_format="numpy",
                                       local_shuffle_buffer_size=4 * optim.batch_size,
                                       local_shuffle_seed=config["seed"] + epoch):
            if batches_done < skip:  # trained on before the restart
                batches_done += 1
                mark = time.perf_counter()
                continue
            fetched = time.perf_counter()
            encoded = [encode_sample(tokenizer, TrainingSample(str(p), str(t)), optim.max_length,
                                     prompt_format)
                       for p, t in zip(rows["prompt"], rows["target"], strict=True)]
            batch = {k: v.to(device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}
            encoded_at = time.perf_counter()
            loss = target_loss(train_model, batch)
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # also waits for the step: the timing below is the GPU's
            tokens += int(batch["attention_mask"].sum())
            stepped = time.perf_counter()
            seconds["data"] += fetched - mark
            seconds["encode"] += encoded_at - fetched
            seconds["step"] += stepped - encoded_at
            if len(losses) == 1:
                seconds["first_step"] = stepped - encoded_at
            step += 1
            batches_done += 1
            mark = stepped
            if every and step % every == 0 and step < total_steps:
                _report_train_state(TrainPosition(epoch, batches_done, step), rank, model, optimizer,
                                    scheduler, engine, resumed_from)
                checkpointed_at = step
                mark = time.perf_counter()
                seconds["checkpoint"] += mark - stepped
        elapsed = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)),
                   "tokens_per_s": tokens * world / max(elapsed, 1e-9), "steps": len(losses),
                   "step": step, "resumed_from_step": resumed_from,
                   **{f"{part}_s": round(value, 2) for part, value in seconds.items()}}
        if epoch + 1 < config["epochs"]:
            if config.get("checkpoint_each_epoch", True) and checkpointed_at != step:
                # A resumable checkpoint at the epoch's end: a failure later loses at most an epoch.
                _report_train_state(TrainPosition(epoch + 1, 0, step), rank, model, optimizer, scheduler, engine,
                                    resumed_from, metrics)
                checkpointed_at = step
            else:
                ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            partitioned = engine is not None and engine.zero_optimization_partition_weights()
            with _full_parameters(model, partitioned):  # every rank enters: ZeRO-3 gathers collectively
                if rank == 0:
                    merged = model.merge_and_unload()
                    # Gathered ZeRO-3 weights are views into shared buffers that go back to their
                    # partitions on leaving the block: the file gets copies.
                    state = ({k: v.detach().to("cpu", copy=True) for k, v in merged.state_dict().items()}
                             if partitioned else None)
                    merged.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if rank == 0:
                tokenizer.save_pretrained(tmp)
                provenance = {**config["provenance"], "prompt_format": prompt_format}
                Path(tmp, BASE_PROVENANCE).write_text(json.dumps(provenance, indent=2))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


@dataclass(frozen=True)
class TrainPosition:
    """Where base training stands: ``step`` optimiser steps done, the last ``batches_done`` of
    them in (0-based) ``epoch``."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0


def _full_parameters(model, partitioned: bool):
    """A block in which every parameter of ``model`` is whole: DeepSpeed ZeRO-3 partitions them
    across ranks, so all ranks must enter; elsewhere (ZeRO-2, DDP, one process) a no-op."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _report_train_state(position: TrainPosition, rank: int, model, optimizer, scheduler, engine,
                        resumed_from: int, metrics: dict | None = None) -> None:
    """Report a resumable checkpoint from every rank (Ray Train merges their directories):
    DeepSpeed's own (each rank its optimiser partition; frozen weights left out), else rank 0's
    trainable weights, optimiser and schedule; each rank's RNG state; ``TRAIN_STATE``. ``metrics``
    (an epoch's, at its end) replace the position's own."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if engine is not None:
            engine.save_checkpoint(tmp, tag=f"step-{position.step}", exclude_frozen_parameters=True)
        elif rank == 0:
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, Path(tmp, "train_state.pt"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, Path(tmp, f"rng-rank{rank}.pt"))
        if rank == 0:
            Path(tmp, TRAIN_STATE).write_text(json.dumps(asdict(position)))
        ray.train.report(metrics or {"epoch": position.epoch + 1, "step": position.step,
                                     "resumed_from_step": resumed_from},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _load_train_state(directory: Path, rank: int, model, optimizer, scheduler, engine) -> TrainPosition:
    """Restore what ``_report_train_state`` wrote into ``directory``; returns the position."""
    import torch

    if engine is not None:
        # The frozen weights were left out of the checkpoint: they are the pretrained model's.
        loaded, _ = engine.load_checkpoint(str(directory), load_module_strict=False)
        if loaded is None:
            raise OppuError(f"no DeepSpeed checkpoint in {directory}")
    else:
        state = torch.load(directory / "train_state.pt", map_location="cpu", weights_only=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state["trainable"]) != trainable:
            raise OppuError(f"checkpoint {directory} holds other trainable weights than this model")
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    # The next step's learning rate is the restored schedule's: restoring a schedule does not set
    # it, and a ZeRO optimiser restored from an elastic checkpoint keeps only its state.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    rng_path = directory / f"rng-rank{rank}.pt"
    if rng_path.exists():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainPosition(**json.loads((directory / TRAIN_STATE).read_text()))


def _is_final(checkpoint) -> bool:
    """Whether a reported checkpoint is the merged model of a finished run (not a resumable one)."""
    import pyarrow.fs

    marker = checkpoint.filesystem.get_file_info(f"{checkpoint.path}/{BASE_PROVENANCE}")
    return marker.type != pyarrow.fs.FileType.NotFound  # asked of the storage: no download


def _report_final_again(checkpoint, config: dict, rank: int) -> None:
    """A restart after the final report (a worker lost on the way out): report the merged model
    again, so that it is the run's latest checkpoint, which ``adapt_base`` publishes."""
    import ray.train

    logger.warning("rank %d: base training had finished; reporting its merged model %s again",
                   rank, checkpoint.path)
    metrics = {"epoch": config["epochs"], "reported_again": True}
    if rank != 0:
        ray.train.report(metrics)
        return
    with checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def adapt_base(cfg: RunConfig, flavour: str, log=logger.info) -> str:
    """Adapt ``cfg.pretrained_uri`` to the task for ``flavour`` and publish it; returns its URI."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from oppu.data.dataset import read_dataset
    from oppu.training.samples import base_samples

    dataset = read_dataset(cfg.data_uri)
    task = dataset.task
    uses_profile, k = parse_flavour(flavour, cfg.base.rag_k)
    profiles = None
    if uses_profile:
        from oppu.profiles import run_profiles

        # Every user's profile is written here, once: the personal adapters and the evaluation
        # of the PAG methods read the same stored profiles.
        profiles = run_profiles(cfg, dataset.users, log)
    samples = base_samples(task, dataset.base_users(), k, cfg.base.include_history_samples,
                           cfg.seed, cfg.base.max_samples, profiles)
    if not samples:
        raise ConfigError(f"no base-training samples in {cfg.data_uri}: the base users have no "
                          "answered queries or history")
    epochs = cfg.base.optim.epochs or task.default_epochs
    log(f"[train_base] {task.name} flavour={flavour} k={k}: {len(samples)} samples from "
        f"{len(dataset.base_users())} base users, {epochs} epochs, {cfg.base.num_workers} worker(s)")
    provenance = {"task": task.name, "flavour": flavour, "rag_k": k, "source_model": cfg.pretrained_uri,
                  "profile_writer": cfg.profiles.writer if profiles is not None else None,
                  "samples": len(samples), "samples_sha256": _samples_digest(samples), "epochs": epochs, "peft": asdict(cfg.base.peft),
                  "optim": asdict(cfg.base.optim), "seed": cfg.seed}
    target = cfg.base_uri(flavour)
    if _published_provenance(target) == provenance:
        log(f"[train_base] reusing {target}: adapted from the same model, samples and settings")
        return target
    train_config = {
        "model": cfg.pretrained_uri, "optim": asdict(cfg.base.optim), "peft": asdict(cfg.base.peft),
        "epochs": epochs, "n_samples": len(samples), "seed": cfg.seed, "use_gpu": cfg.base.use_gpu,
        "prompt_format": cfg.prompt_format, "checkpoint_every_steps": cfg.base.checkpoint_every_steps,
        "checkpoint_each_epoch": cfg.base.checkpoint_each_epoch,
        "deepspeed": _deepspeed_config(cfg), "provenance": provenance,
    }
    trainer = TorchTrainer(
        train_base_loop,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.base.num_workers, use_gpu=cfg.base.use_gpu,
            resources_per_worker={"GPU": cfg.base.gpus_per_worker} if cfg.base.use_gpu else None),
        datasets={"train": ray.data.from_items([{"prompt": s.prompt, "target": s.target}
                                                for s in samples])},
        run_config=TrainRunConfig(
            name=_run_name(task.lamp_name, flavour, train_config, cfg.base.num_workers),
            storage_path=_train_storage(cfg),
            # A lost worker restarts the worker group, which resumes from the latest checkpoint;
            # only the newest two are kept (the last resumable one and the merged model).
            failure_config=FailureConfig(max_failures=cfg.base.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    started = time.perf_counter()
    result = trainer.fit()
    log(f"[train_base] done in {time.perf_counter() - started:.0f}s: {result.metrics}")
    with result.checkpoint.as_directory() as checkpoint_dir:
        if not Path(checkpoint_dir, BASE_PROVENANCE).exists():
            raise OppuError(f"base training ended on {result.checkpoint.path}, which is not a merged model")
        fsutil.publish_dir(checkpoint_dir, target)
    log(f"[train_base] wrote {target}")
    return target


def _run_name(lamp_name: str, flavour: str, train_config: dict, num_workers: int) -> str:
    """Ray Train's name for a base run: Ray Train hands a run the latest checkpoint stored under
    its name, so the name carries a digest of everything a checkpoint depends on: a rerun of an
    interrupted run resumes it, a run with other settings starts afresh."""
    identity = {k: v for k, v in train_config.items() if k not in ("checkpoint_every_steps", "checkpoint_each_epoch")}
    digest = hashlib.sha256(json.dumps([identity, num_workers], sort_keys=True).encode()).hexdigest()
    return f"oppu-base-{lamp_name}-{flavour}-{digest[:12]}"


def _samples_digest(samples) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.prompt, sample.target]).encode())
    return digest.hexdigest()


def _published_provenance(base_uri: str) -> dict | None:
    """What ``oppu-base.json`` of a published base says it was adapted from (None: no base there)."""
    uri = fsutil.join(base_uri, BASE_PROVENANCE)
    if not fsutil.exists(uri):
        return None
    recorded = fsutil.read_json(uri)
    recorded.pop("prompt_format", None)  # resolved from the model: follows from the rest
    return recorded


def _deepspeed_config(cfg: RunConfig) -> dict | None:
    if not cfg.base.deepspeed:
        return None
    if not cfg.base.use_gpu:
        raise ConfigError("base.deepspeed needs base.use_gpu=true (on CPU the trainer uses DDP)")
    return json.loads(fsutil.read_text(cfg.base.deepspeed))


def _train_storage(cfg: RunConfig) -> str:
    """Ray Train's checkpoint storage: ``base.train_storage``, else under the run dir, so that
    multi-node runs share it (S3 servers that refuse Ray's empty multipart probe need the former)."""
    uri = cfg.base.train_storage or fsutil.join(cfg.run_dir, "ray-train")
    return uri if fsutil.is_remote(uri) else str(fsutil.local_path(uri).resolve())
