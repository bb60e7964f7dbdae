"""Task adaptation of the base LLM (paper section 2.2): LoRA on the non-test users, merged in.

``adapt_bases`` is what ``jobs/train_base.py`` runs on the driver: it builds every flavour's
samples, reuses the flavours whose published base was adapted from the same samples and settings,
and trains all the others in ONE ``TorchTrainer`` run (DDP on CPU, DeepSpeed ZeRO when a DeepSpeed
config is given on GPU), so that the run's start, the workers' imports and the model load are paid
once, not once per flavour. ``adapt_base`` is that for one flavour.

``train_base_loop`` is the run's worker function; it depends only on its ``config`` dict. It loads
the pretrained model once and, flavour after flavour, LoRA-trains a copy of the pristine weights on
its shard of the flavour's dataset, merges it, and rank 0 publishes the merged model (with
``BASE_PROVENANCE``, what it was adapted from, and ``BASE_TRAIN_STATS``, where the time went) as
``run_dir/base[-flavour]``.

Resumable checkpoints, every ``base.checkpoint_every_steps`` steps and at the end of every epoch but
a flavour's last (``base.checkpoint_each_epoch``), record the flavour and the position in it
(``oppu.training.base_state``). A worker group restarted after a failure skips the flavours already published
and resumes the current one from the latest checkpoint.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from oppu import fsutil
from oppu.errors import ConfigError, OppuError
from oppu.run_config import OptimSettings, PeftSettings, RunConfig, parse_flavour
from oppu.training.base_state import (
    TrainPosition,
    absolute,
    checkpoint_position,
    full_parameters,
    host_copy,
    load_train_state,
    rank0_decides,
    report_train_state,
    run_name,
    train_storage,
)

logger = logging.getLogger(__name__)

BASE_PROVENANCE = "oppu-base.json"  # a merged base: what it was adapted from
BASE_TRAIN_STATS = "oppu-base-train.json"  # a merged base: seconds by phase, steps and loss of its training
PUBLISHED_POLL_S = 2.0  # how often the driver looks for newly published bases while the run goes on


def train_base_loop(config: dict) -> None:
    """Ray Train worker: for each flavour of ``config["flavours"]`` in turn, LoRA-train the
    pretrained model on this worker's shard of the flavour's dataset, merge, and publish (rank 0).

    The model is loaded once and kept on the host; each flavour trains a copy of those pristine
    weights with a LoRA seeded as a run of that flavour alone seeds it, so a flavour's base is the
    same whichever flavours share its run. Started again by Ray Train after a failure, it skips the
    flavours published by then and resumes the one the latest checkpoint is of, skipping the
    batches done.
    """
    started = time.perf_counter()
    import ray.train
    import ray.train.torch
    import torch

    from oppu.models import load_model
    from oppu.models.loading import default_dtype
    from oppu.models.prompting import resolve_prompt_format

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    pristine, tokenizer = load_model(config["model"], device="cpu", dtype=default_dtype(str(device)))
    prompt_format = resolve_prompt_format(config["prompt_format"], tokenizer)
    resume = ray.train.get_checkpoint()
    resume_at = checkpoint_position(resume) if resume is not None else None
    setup_s = time.perf_counter() - started
    logger.info("rank %d: set up in %.1fs (%s loaded)", rank, setup_s, config["model"])

    flavours = config["flavours"]
    to_train = [i for i, spec in enumerate(flavours) if spec["dataset"] is not None]
    for index in to_train:
        spec = flavours[index]
        # Rank 0 looks, every rank follows: all must take the same branch (collectives follow).
        if rank0_decides(rank == 0 and _published_provenance(spec["target"]) == spec["provenance"], device):
            logger.warning("rank %d: %s is published already (a restarted worker group): skipped",
                           rank, spec["flavour"])
            continue
        # The last flavour trains the loaded weights themselves; the others a copy of them.
        model = pristine if index == to_train[-1] else copy.deepcopy(pristine)
        checkpoint = resume if resume_at is not None and resume_at.flavour == index else None
        _adapt_flavour(config, index, model, tokenizer, prompt_format, device, checkpoint, setup_s)
        resume_at = None  # checkpoints reported since: the one resumed from may be gone
        setup_s = None  # paid by the first flavour this worker group trained
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _adapt_flavour(config: dict, index: int, model, tokenizer, prompt_format: str, device, resume,
                   setup_s: float | None) -> None:
    """Flavour ``index`` of ``config["flavours"]``: move ``model`` (pristine weights) to ``device``,
    wrap it in a fresh LoRA, train it (from the resumable checkpoint ``resume`` where one is
    given), merge it, publish it from rank 0, and report the flavour's metrics from every rank.
    ``setup_s``, the worker's set-up time, goes with the first flavour a worker group trains (None
    for the others)."""
    import peft as peft_lib
    import ray.train
    import ray.train.torch
    import torch
    from transformers import get_linear_schedule_with_warmup

    from oppu.models.fp8 import restore_base_linears, set_base_precision
    from oppu.models.kernels import use_kernels
    from oppu.models.samples import collate, encode_samples, target_loss
    from oppu.tasks.base import TrainingSample

    spec = config["flavours"][index]
    flavour = spec["flavour"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    optim = OptimSettings(**config["optim"])
    began = time.perf_counter()
    model = model.to(device)
    # FP8 for the frozen base's GEMMs (base.base_precision): quantized here, once per flavour, and
    # undone before the merge, which writes the LoRA into the bf16 weights.
    set_base_precision(model, config.get("base_precision", "bf16"))
    use_kernels(model, config.get("kernels", "torch"), key="base.kernels")
    torch.manual_seed(config["seed"])
    model = peft_lib.get_peft_model(model, PeftSettings(**config["peft"]).to_peft_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = max(1, math.ceil(spec["n_samples"] / (optim.batch_size * world)))
    total_steps = steps_per_epoch * spec["epochs"]

    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(optim.warmup_ratio * total_steps), total_steps)
    engine = None
    if config.get("deepspeed"):
        try:
            import deepspeed
        except ImportError as exc:
            raise ConfigError(f"base.deepspeed is set, and DeepSpeed cannot be imported on this worker ({exc}): "
                              "pip install 'oppu[gpu]' (or deepspeed) where the workers run, or unset "
                              "base.deepspeed") from exc

        # base.optim rules under DeepSpeed too: the JSON's own optimizer and scheduler sections
        # would silently replace its lr, weight decay, warmup and decay, so they are dropped.
        ds_config = {k: v for k, v in config["deepspeed"].items() if k not in ("optimizer", "scheduler")}
        ds_config.setdefault("train_micro_batch_size_per_gpu", optim.batch_size)
        ds_config.setdefault("gradient_clipping", optim.max_grad_norm)
        ds_config["zero_allow_untested_optimizer"] = True  # torch's AdamW, as on the DDP path
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    position = TrainPosition(index)
    if resume is not None:
        with resume.as_directory() as resume_dir:
            position = load_train_state(Path(resume_dir), rank, model, optimizer, scheduler, engine)
        logger.warning("rank %d resumes %s at step %d (epoch %d, %d batches done) from %s", rank, flavour,
                       position.step, position.epoch + 1, position.batches_done, resume.path)
    if engine is not None:
        train_model = engine
    else:
        train_model = ray.train.torch.prepare_model(model) if world > 1 else model
    engine_init_s = time.perf_counter() - began

    shard = ray.train.get_dataset_shard(spec["dataset"])
    train_model.train()
    step, resumed_from = position.step, position.step
    every = config["checkpoint_every_steps"]  # none at the final step: the merged model follows it
    checkpointed_at = step  # the step of the last resumable checkpoint (or of the one resumed from)
    training = time.perf_counter()
    for epoch in range(position.epoch, spec["epochs"]):
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
            encoded = encode_samples(tokenizer, [TrainingSample(str(p), str(t)) for p, t in
                                                 zip(rows["prompt"], rows["target"], strict=True)],
                                     optim.max_length, prompt_format)
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
                report_train_state(TrainPosition(index, epoch, batches_done, step), flavour, rank, model,
                                    optimizer, scheduler, engine, resumed_from)
                checkpointed_at = step
                mark = time.perf_counter()
                seconds["checkpoint"] += mark - stepped
        elapsed = time.perf_counter() - started
        metrics = {"flavour": flavour, "epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)),
                   "tokens_per_s": tokens * world / max(elapsed, 1e-9), "steps": len(losses),
                   "step": step, "resumed_from_step": resumed_from,
                   **{f"{part}_s": round(value, 2) for part, value in seconds.items()}}
        if epoch + 1 == spec["epochs"]:
            break  # the flavour's last metrics come with its publication
        if config.get("checkpoint_each_epoch", True) and checkpointed_at != step:
            # A resumable checkpoint at the epoch's end: a failure later loses at most an epoch.
            report_train_state(TrainPosition(index, epoch + 1, 0, step), flavour, rank, model, optimizer,
                                scheduler, engine, resumed_from, metrics)
            checkpointed_at = step
        else:
            ray.train.report(metrics)
    train_s = time.perf_counter() - training

    merging = time.perf_counter()
    restore_base_linears(model)
    partitioned = engine is not None and engine.zero_optimization_partition_weights()
    seconds = {"engine_init_s": round(engine_init_s, 2), "train_s": round(train_s, 2)}
    if setup_s is not None:
        seconds = {"setup_s": round(setup_s, 2), **seconds}
    stats = {**seconds, **{k: metrics[k] for k in ("loss", "tokens_per_s", "step", "resumed_from_step")},
             # where the last epoch's time went: waiting on the data shard, tokenizing, the model step
             "last_epoch_s": {part: metrics[f"{part}_s"] for part in ("data", "encode", "step", "checkpoint")}}
    with tempfile.TemporaryDirectory() as tmp:
        with full_parameters(model, partitioned):  # every rank enters: ZeRO-3 gathers collectively
            if rank == 0:
                merged = model.merge_and_unload()
                # Gathered ZeRO-3 weights are views into shared buffers that go back to their
                # partitions on leaving the block: the file gets copies (tied ones still shared).
                state = host_copy(merged.state_dict()) if partitioned else None
                merged.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if rank == 0:
            tokenizer.save_pretrained(tmp)
            provenance = {**spec["provenance"], "prompt_format": prompt_format}
            Path(tmp, BASE_PROVENANCE).write_text(json.dumps(provenance, indent=2))
            stats["merge_s"] = round(time.perf_counter() - merging, 2)  # merged and saved, not yet published
            Path(tmp, BASE_TRAIN_STATS).write_text(json.dumps(stats, indent=2))
            fsutil.publish_dir(tmp, spec["target"])
    merge_publish_s = time.perf_counter() - merging
    if engine is not None:
        engine.destroy()  # its hooks and buffers go with it: the next flavour builds its own
    logger.info("rank %d: %s published to %s: engine init %.1fs, train %.1fs, merge+publish %.1fs", rank, flavour,
                spec["target"], engine_init_s, train_s, merge_publish_s)
    # Every rank reports once rank 0 has published (a report waits for all ranks): none starts the
    # next flavour before this one is out.
    ray.train.report({**metrics, **seconds, "published": True, "merge_publish_s": round(merge_publish_s, 2)})


def adapt_bases(cfg: RunConfig, flavours: list[str], log=logger.info) -> dict[str, str]:
    """Adapt ``cfg.pretrained_uri`` to the task for each of ``flavours`` and publish the merged
    bases; returns each flavour's base URI.

    A flavour whose published base was adapted from the same model, samples and settings is
    reused; all the others train one after another in one Ray Train run (``train_base_loop``).
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from oppu.data.dataset import read_dataset
    from oppu.training.samples import base_samples

    started = time.perf_counter()
    flavours = list(dict.fromkeys(flavours))
    dataset = read_dataset(cfg.data_uri)
    task = dataset.task
    profiles = None
    if any(parse_flavour(f, cfg.base.rag_k)[0] for f in flavours):
        from oppu.profiles import run_profiles

        # Every user's profile is written here, once: the personal adapters and the evaluation
        # of the PAG methods read the same stored profiles.
        profiles = run_profiles(cfg, dataset.users, log)
    epochs = cfg.base.optim.epochs or task.default_epochs
    specs, datasets = [], {}
    for index, flavour in enumerate(flavours):
        uses_profile, k = parse_flavour(flavour, cfg.base.rag_k)
        samples = base_samples(task, dataset.base_users(), k, cfg.base.include_history_samples,
                               cfg.seed, cfg.base.max_samples, profiles if uses_profile else None)
        if not samples:
            raise ConfigError(f"no base-training samples in {cfg.data_uri}: the base users have no "
                              "answered queries or history")
        provenance = {"task": task.name, "flavour": flavour, "rag_k": k, "source_model": cfg.pretrained_uri,
                      "profile_writer": cfg.profiles.writer if uses_profile else None,
                      "samples": len(samples), "samples_sha256": _samples_digest(samples), "epochs": epochs,
                      "peft": asdict(cfg.base.peft), "optim": asdict(cfg.base.optim), "seed": cfg.seed}
        if cfg.base.base_precision != "bf16":  # recorded only then: bf16 bases keep their provenance
            provenance["base_precision"] = cfg.base.base_precision
        if cfg.base.kernels != "torch":  # the same: recorded only where not the default
            provenance["kernels"] = cfg.base.kernels
        target = cfg.base_uri(flavour)
        spec = {"flavour": flavour, "n_samples": len(samples), "epochs": epochs, "provenance": provenance,
                "target": absolute(target), "dataset": None}
        if _published_provenance(target) == provenance:
            log(f"[train_base] reusing {target}: adapted from the same model, samples and settings")
        else:
            log(f"[train_base] {task.name} flavour={flavour} k={k}: {len(samples)} samples from "
                f"{len(dataset.base_users())} base users, {epochs} epochs, {cfg.base.num_workers} worker(s)")
            spec["dataset"] = f"train-{index}"
            datasets[spec["dataset"]] = ray.data.from_items([{"prompt": s.prompt, "target": s.target}
                                                             for s in samples])
        specs.append(spec)
    targets = {spec["flavour"]: cfg.base_uri(spec["flavour"]) for spec in specs}
    if not datasets:
        return targets
    train_config = {
        "model": cfg.pretrained_uri, "optim": asdict(cfg.base.optim), "peft": asdict(cfg.base.peft),
        "seed": cfg.seed, "use_gpu": cfg.base.use_gpu, "prompt_format": cfg.prompt_format,
        "checkpoint_every_steps": cfg.base.checkpoint_every_steps,
        "checkpoint_each_epoch": cfg.base.checkpoint_each_epoch,
        "deepspeed": _deepspeed_config(cfg), "flavours": specs, "base_precision": cfg.base.base_precision,
        "kernels": cfg.base.kernels,
    }
    trainer = TorchTrainer(
        train_base_loop,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.base.num_workers, use_gpu=cfg.base.use_gpu,
            resources_per_worker={"GPU": cfg.base.gpus_per_worker} if cfg.base.use_gpu else None),
        datasets=datasets,
        run_config=TrainRunConfig(
            name=run_name(task.lamp_name, train_config, cfg.base.num_workers),
            storage_path=train_storage(cfg),
            # A lost worker restarts the worker group, which skips the published flavours and
            # resumes the current one from the latest checkpoint; the newest two are kept.
            failure_config=FailureConfig(max_failures=cfg.base.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    fitting = time.perf_counter()
    _fit_logging_each_base(trainer, [spec for spec in specs if spec["dataset"] is not None], log)
    log(f"[train_base] {len(datasets)} base(s) trained in one Ray Train run in {time.perf_counter() - fitting:.0f}s "
        f"({time.perf_counter() - started:.0f}s with the samples)")
    return targets


def adapt_base(cfg: RunConfig, flavour: str, log=logger.info) -> str:
    """Adapt ``cfg.pretrained_uri`` to the task for ``flavour`` and publish it; returns its URI."""
    return adapt_bases(cfg, [flavour], log)[flavour]


def _fit_logging_each_base(trainer, specs: list[dict], log) -> None:
    """``trainer.fit()``, logging each flavour of ``specs`` as its base is published (the workers
    publish them; the driver looks every ``PUBLISHED_POLL_S``). Raises where the run ended with one
    not published."""
    pending = {spec["flavour"]: spec for spec in specs}
    last_done = [time.perf_counter()]

    def log_published() -> None:
        for flavour, spec in list(pending.items()):
            if _published_provenance(spec["target"]) == spec["provenance"]:
                now = time.perf_counter()
                log(f"[train_base] {flavour} done in {now - last_done[0]:.0f}s: {spec['target']} "
                    f"({_stats_line(spec['target'])})")
                last_done[0] = now
                del pending[flavour]

    finished = threading.Event()

    def watch() -> None:
        while pending and not finished.wait(PUBLISHED_POLL_S):
            try:
                log_published()
            except Exception as exc:  # noqa: BLE001 - a progress line is not worth failing the run for
                logger.debug("[train_base] looking for published bases: %s", exc)

    watcher = threading.Thread(target=watch, name="oppu-base-published", daemon=True)
    watcher.start()
    try:
        trainer.fit()
    finally:
        finished.set()
        watcher.join()
    log_published()
    if pending:
        raise OppuError(f"base training ended without publishing {', '.join(pending)} "
                        f"({', '.join(spec['target'] for spec in pending.values())})")


def _stats_line(base_uri: str) -> str:
    """Where a published base's training time went, from its ``BASE_TRAIN_STATS``."""
    uri = fsutil.join(base_uri, BASE_TRAIN_STATS)
    if not fsutil.exists(uri):
        return "no training stats"
    stats = fsutil.read_json(uri)
    setup = f"worker set-up {stats['setup_s']:.0f}s, " if "setup_s" in stats else ""
    parts = stats.get("last_epoch_s")
    split = (" (last epoch: " + ", ".join(f"{part} {value:.1f}s" for part, value in parts.items()) + ")"
             if parts else "")
    return (f"{setup}engine init {stats['engine_init_s']:.0f}s, train {stats['train_s']:.0f}s{split}, merge+save "
            f"{stats['merge_s']:.0f}s; {stats['step']} steps (resumed from {stats['resumed_from_step']}), "
            f"{stats['tokens_per_s']:,.0f} tokens/s, last epoch's loss {stats['loss']:.4f}")


def _samples_digest(samples) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.prompt, sample.target]).encode())
    return digest.hexdigest()


def _published_provenance(base_uri: str) -> dict | None:
    """What ``oppu-base.json`` of a published base says it was adapted from (None: no complete base
    there; an object store's base is complete once its ``config.json``, written last, is there)."""
    uri = fsutil.join(base_uri, BASE_PROVENANCE)
    if not (fsutil.exists(uri) and fsutil.exists(fsutil.join(base_uri, fsutil.MARKER_FILE))):
        return None
    recorded = fsutil.read_json(uri)
    recorded.pop("prompt_format", None)  # resolved from the model: follows from the rest
    return recorded


def _deepspeed_config(cfg: RunConfig) -> dict | None:
    if not cfg.base.deepspeed:
        return None
    ds_config = json.loads(fsutil.read_text(cfg.base.deepspeed))
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if cfg.base.base_precision != "bf16" and stage == 3:
        raise ConfigError(f"base.base_precision={cfg.base.base_precision} quantizes each linear weight once, "
                          f"whole, and ZeRO-3 ({cfg.base.deepspeed}) partitions the weights across GPUs: "
                          "use a ZeRO-2 config, or base.base_precision=bf16")
    return ds_config
