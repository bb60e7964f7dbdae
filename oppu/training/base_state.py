"""A base-training run's resumable state: where it stands, and its checkpoints on every rank.

A checkpoint (``oppu.training.base``: every ``base.checkpoint_every_steps`` steps and at an epoch's
end) holds DeepSpeed's own per-rank optimiser partitions (frozen weights left out) or, without
DeepSpeed, rank 0's trainable weights, optimiser and schedule; each rank's RNG state; and
``TRAIN_STATE``, the position. A restarted worker group reads the position first (no download)
and every rank restores its part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oppu import fsutil
from oppu.errors import OppuError

if TYPE_CHECKING:
    from oppu.run_config import RunConfig

TRAIN_STATE = "oppu-train-state.json"  # a resumable checkpoint's position (TrainPosition)


@dataclass(frozen=True)
class TrainPosition:
    """Where base training stands: in flavour ``flavour`` (its index in the run's list),
    ``step`` optimiser steps done, the last ``batches_done`` of them in (0-based) ``epoch``."""

    flavour: int = 0
    epoch: int = 0
    batches_done: int = 0
    step: int = 0


def rank0_decides(value, device):
    """Rank 0's ``value``, on every rank."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def checkpoint_position(checkpoint) -> TrainPosition:
    """The position a resumable checkpoint records, asked of the storage (no download)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAIN_STATE}") as stream:
        return TrainPosition(**json.loads(stream.read()))


def full_parameters(model, partitioned: bool):
    """A block in which every parameter of ``model`` is whole: DeepSpeed ZeRO-3 partitions them
    across ranks, so all ranks must enter; elsewhere (ZeRO-2, DDP, one process) a no-op."""
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def host_copy(state: dict) -> dict:
    """``state`` (name -> tensor) copied to host memory, a tensor shared under several names (tied
    weights: a Llama's embedding and output head) copied once and still shared, so that
    ``save_pretrained`` writes it once, as it does from the model itself."""
    copies: dict[tuple, object] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() == 0 or key not in copies:  # empty tensors may all sit at address 0
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def report_train_state(position: TrainPosition, flavour: str, rank: int, model, optimizer, scheduler, engine,
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
        ray.train.report(metrics or {"flavour": flavour, "epoch": position.epoch + 1, "step": position.step,
                                     "resumed_from_step": resumed_from},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_train_state(directory: Path, rank: int, model, optimizer, scheduler, engine) -> TrainPosition:
    """Restore what ``report_train_state`` wrote into ``directory``; returns the position."""
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


def run_name(lamp_name: str, train_config: dict, num_workers: int) -> str:
    """Ray Train's name for a base run: Ray Train hands a run the latest checkpoint stored under
    its name, so the name carries a digest of everything a checkpoint depends on, every flavour's
    samples and settings included: a rerun of an interrupted run resumes it, a run with other
    settings starts afresh. Where the bases go, which of them were published when the run started
    and the checkpoint interval are left out."""
    identity = {k: v for k, v in train_config.items()
                if k not in ("checkpoint_every_steps", "checkpoint_each_epoch", "flavours")}
    identity["flavours"] = [{k: v for k, v in spec.items() if k not in ("target", "dataset")}
                            for spec in train_config["flavours"]]
    digest = hashlib.sha256(json.dumps([identity, num_workers], sort_keys=True).encode()).hexdigest()
    flavours = [spec["flavour"] for spec in train_config["flavours"]]
    named = flavours[0] if len(flavours) == 1 else f"{len(flavours)}-flavours"
    return f"oppu-base-{lamp_name}-{named}-{digest[:12]}"


def absolute(uri: str) -> str:
    """``uri`` as the workers must be given it: a local path made absolute (their working
    directory is not the driver's)."""
    return uri if fsutil.is_remote(uri) else str(fsutil.local_path(uri).resolve())


def train_storage(cfg: RunConfig) -> str:
    """Ray Train's checkpoint storage: ``base.train_storage``, else under the run dir, so that
    multi-node runs share it (S3 servers that refuse Ray's empty multipart probe need the former)."""
    return absolute(cfg.base.train_storage or fsutil.join(cfg.run_dir, "ray-train"))
