"""The settings of each stage of a run, one dataclass per section of the run config: ``base``
(``BaseStage``), ``users`` (``UserStage``, with ``batched`` and ``incremental``), ``eval``
(``EvalStage``), ``profiles``, ``ray``; ``peft`` and ``optim`` inside the training stages. Each
checks its own values (``ConfigError`` naming the key); ``RunConfig`` (``oppu.run_config.run``)
holds them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from oppu.errors import ConfigError
from oppu.run_config.names import parse_flavour

PeftMethod = Literal["lora", "ia3", "prompt_tuning"]
# The frozen base's GEMMs: in its own dtype (bf16 on a GPU, fp32 on CPU), or FP8 on the GPU's
# FP8 tensor cores (oppu.models.fp8): "fp8" scales per row (e4m3 throughout), "fp8-tensor" per
# tensor (e5m2 gradients). LoRA stays in bf16/fp32 either way.
BasePrecision = Literal["bf16", "fp8", "fp8-tensor"]
BASE_PRECISIONS = ("bf16", "fp8", "fp8-tensor")
# The base's RMSNorm, SwiGLU and RoPE in training: torch's eager modules, or liger-kernel's
# fused Triton kernels (oppu.models.kernels).
Kernels = Literal["torch", "liger"]
KERNELS = ("torch", "liger")


def check_base_precision(key: str, value: str, on_gpu: bool, gpu_key: str) -> None:
    """``ConfigError`` naming ``key`` when ``value`` is not a base precision, or is FP8 without a GPU."""
    if value not in BASE_PRECISIONS:
        raise ConfigError(f"{key} must be one of {list(BASE_PRECISIONS)}, got {value!r}")
    if value != "bf16" and not on_gpu:
        raise ConfigError(f"{key}={value} runs the base's GEMMs on a GPU's FP8 tensor cores (H100, L4, L40S, "
                          f"...), and {gpu_key} trains on CPU: give it GPUs, or set {key}=bf16")


def check_kernels(key: str, value: str, on_gpu: bool, gpu_key: str) -> None:
    """``ConfigError`` naming ``key`` when ``value`` is not a kernel choice, or is liger without a GPU."""
    if value not in KERNELS:
        raise ConfigError(f"{key} must be one of {list(KERNELS)}, got {value!r}")
    if value == "liger" and not on_gpu:
        raise ConfigError(f"{key}=liger runs liger-kernel's Triton kernels on CUDA GPUs only, and {gpu_key} "
                          f"trains on CPU: give it GPUs, or set {key}=torch")


@dataclass
class PeftSettings:
    """Which PEFT module to train and its shape (PEFT's own config is built from this)."""

    method: PeftMethod = "lora"
    r: int = 8  # LoRA rank
    alpha: int = 8  # LoRA alpha (scaling = alpha / r)
    dropout: float = 0.05  # LoRA dropout
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_virtual_tokens: int = 8  # prompt tuning only

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("peft.target_modules must name at least one module")

    def to_peft_config(self, inference_mode: bool = False):
        import peft

        if self.method == "lora":
            return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                   target_modules=list(self.target_modules), bias="none",
                                   task_type="CAUSAL_LM", inference_mode=inference_mode)
        if self.method == "ia3":
            feedforward = [m for m in self.target_modules if m in ("down_proj", "up_proj", "gate_proj")]
            return peft.IA3Config(target_modules=list(self.target_modules),
                                  feedforward_modules=feedforward, task_type="CAUSAL_LM",
                                  inference_mode=inference_mode)
        return peft.PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens,
                                       task_type="CAUSAL_LM", inference_mode=inference_mode)


@dataclass
class OptimSettings:
    """Optimiser and schedule; defaults are the OPPU authors' (lamp-formats.md)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3  # gradient clipping
    warmup_ratio: float = 0.1  # linear warmup share, then linear decay to 0
    batch_size: int = 16  # samples per optimiser step
    epochs: int | None = None  # None: the task's default (3 classification/rating, 2 generation)
    max_length: int = 2048  # tokens per sample; longer prompts are cut from the left

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class BaseStage:
    """Task adaptation of the base LLM on the non-test users (jobs/train_base.py)."""

    # plain, rag (trained at rag_k), rag-k<N>, profile, profile+rag-k<N>: see parse_flavour
    flavours: list[str] = field(default_factory=lambda: ["plain", "rag"])
    rag_k: int = 1  # retrieved items in the prompts of the flavour named plain "rag"
    peft: PeftSettings = field(default_factory=lambda: PeftSettings(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(epochs=3))
    include_history_samples: bool = True  # also learn from base users' history items
    max_samples: int | None = None  # cap on training samples (None: all)
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    # GPUs each worker holds; a fraction lets flavours adapted at once share one GPU
    gpus_per_worker: float = 1.0
    # flavours adapted at once, each its own Ray Train run (one GPU's worth of small models at
    # once keeps it busy where one run alone leaves it idle between steps)
    parallel_flavours: int = 1
    # path to a DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json; made for GPU workers (CPU
    # workers run it on DeepSpeed's CPU accelerator over gloo: the tests' way to check it without a GPU)
    deepspeed: str | None = None
    train_storage: str | None = None  # Ray Train checkpoint storage; default run_dir/ray-train (shared by all nodes)
    # optimiser steps between resumable checkpoints (adapter, optimiser, schedule, data position); 0: none
    checkpoint_every_steps: int = 50
    # also a resumable checkpoint at the end of every epoch but the last (where no step's fell there)
    checkpoint_each_epoch: bool = True
    max_failures: int = 2  # worker-group restarts, each resuming from the last checkpoint; -1: unlimited
    # the frozen base's GEMMs during adaptation: bf16, or fp8 / fp8-tensor (GPU workers; not with
    # DeepSpeed ZeRO-3, whose partitioned weights cannot be quantized once)
    base_precision: BasePrecision = "bf16"
    # the base's RMSNorm, SwiGLU and RoPE during adaptation: torch's, or liger-kernel's fused
    # kernels (liger: GPU workers only; oppu.models.kernels)
    kernels: Kernels = "torch"

    def __post_init__(self) -> None:
        if self.rag_k < 1:
            raise ConfigError(f"base.rag_k must be >= 1, got {self.rag_k}")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(f"base.checkpoint_every_steps must be >= 0 (0: none within an epoch), "
                              f"got {self.checkpoint_every_steps}")
        if self.max_failures < -1:
            raise ConfigError(f"base.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.parallel_flavours < 1:
            raise ConfigError(f"base.parallel_flavours must be >= 1, got {self.parallel_flavours}")
        if self.gpus_per_worker <= 0 or (self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer()):
            raise ConfigError(f"base.gpus_per_worker must be a fraction in (0, 1] or a whole number, "
                              f"got {self.gpus_per_worker}")
        for flavour in self.flavours:
            parse_flavour(flavour, self.rag_k)
        check_base_precision("base.base_precision", self.base_precision, self.use_gpu, "base.use_gpu=false")
        check_kernels("base.kernels", self.kernels, self.use_gpu, "base.use_gpu=false")


@dataclass
class BatchedSettings:
    """Knobs of ``users.trainer: batched``: they change speed and memory, not the adapters."""

    max_active_users: int = 8  # users training at once in an actor (LoRA slots)
    tokens_per_forward: int = 16384  # padded tokens per micro-batch (activation memory); >= optim.max_length
    gradient_checkpointing: bool = False  # only where activation memory demands it

    def __post_init__(self) -> None:
        if self.max_active_users < 1:
            raise ConfigError(f"users.batched.max_active_users must be >= 1, got {self.max_active_users}")


@dataclass
class IncrementalSettings:
    """Knobs of ``users.update: incremental``: how a user's current adapter is continued on new history."""

    # old items replayed per new item: a sample of the items the current adapter saw, seeded by
    # (seed, user, the version continued); at most all of them. 0.25 keeps an update after a
    # fifth of the history came new within a quarter of a full retrain's tokens (bench/lifecycle.py)
    replay_ratio: float = 0.25
    epochs: int | None = None  # epochs over the new and replayed items; None: those of a full retrain

    def __post_init__(self) -> None:
        if self.replay_ratio < 0:
            raise ConfigError(f"users.incremental.replay_ratio must be >= 0, got {self.replay_ratio}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"users.incremental.epochs must be >= 1, got {self.epochs}")


@dataclass
class UserStage:
    """One personal adapter per test user (jobs/train_users.py).

    ``trainer`` picks how an actor trains the users of a batch:

    - ``per-user`` (default): one user after another, each with its own PEFT model
      (``oppu.training.personal``). A user's adapter is bit-identical whatever else ran, so runs
      reproduce exactly; every PEFT method (``lora``, ``ia3``, ``prompt_tuning``) works. The right
      choice on CPU, where batching users buys little.
    - ``batched``: the users of a batch train together over the one frozen base, rows of many
      users in each forward pass, each with its own LoRA, optimiser, schedule, clipping and epochs
      (``oppu.training.batched``; ``batched`` holds its knobs). The same recipe and sample order as
      per-user, and a user's adapter is the same alone or in any company up to floating-point
      order (LoRA dropout masks aside), but its LoRA init draws differ from PEFT's, so it is not
      bit-identical to the per-user adapter. Many times faster on a GPU; LoRA only.
      Give each actor enough users to fill its slots: ``users_per_batch`` a few times
      ``batched.max_active_users``.

    ``update`` picks what training starts from when a user already has an adapter:

    - ``full`` (default): from scratch, on the user's whole history.
    - ``incremental``: where the user's current adapter (the one served) was trained on a prefix
      of their history, with the same PEFT shape and prompt format, it is loaded and trained on
      for ``incremental.epochs`` on the items after that prefix plus a seeded replay sample of
      older ones (``incremental.replay_ratio`` per new item); its manifest names the version it
      continued (``data_range.update``). Anyone else (no adapter, no new items, an edited history,
      another shape) trains from scratch, as ``full`` does. Per-user trainer only.
    """

    variants: list[str] = field(default_factory=lambda: ["oppu", "rag-k1+oppu"])
    peft: PeftSettings = field(default_factory=PeftSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    trainer: Literal["per-user", "batched"] = "per-user"
    batched: BatchedSettings = field(default_factory=BatchedSettings)
    # nf4: QLoRA, the frozen base held in 4-bit NF4 (bitsandbytes; CUDA GPU actors only) under
    # full-precision adapters; a quarter of bf16's weight memory, for bases too large for the GPU
    quantize: Literal["none", "nf4"] = "none"
    # the frozen base's GEMMs (forward and input gradient) in bf16, or in FP8 (fp8: per-row scales;
    # fp8-tensor: per-tensor) on a GPU's FP8 tensor cores, weights quantized once per base load
    # (oppu.models.fp8); either trainer; not with quantize=nf4
    base_precision: BasePrecision = "bf16"
    # the base's RMSNorm, SwiGLU and RoPE: torch's eager modules, or liger-kernel's fused Triton
    # kernels (liger: CUDA GPU actors only, `pip install 'oppu[liger]'`; oppu.models.kernels);
    # either trainer, the adapters the same up to floating-point order
    kernels: Kernels = "torch"
    actors: int = 2  # Ray Data actor pool size; each actor loads the base once
    users_per_batch: int = 4  # users handed to an actor at a time (consecutive in history length)
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0  # fractions share a GPU between actors
    users: list[str] | None = None  # only these users (default: every test user)
    skip_existing: bool = True  # skip users whose adapter for the same data and config exists
    max_retries: int = 2  # re-runs of a batch whose actor died; then its unfinished users fail
    # variants trained at once, each its own actor pool (actors x num_gpus_per_actor GPUs each)
    parallel_variants: int = 1
    # users of a variant that may fail before train_users fails (after writing its report); -1: any
    # number. Also `oppu train-users --max-failed-users N`.
    max_failed_users: int = 0
    # versions of a user's adapter kept per variant: after each publish (training, `oppu adapters
    # import`) older ones are deleted, never the current one (which a rollback may have made an old one)
    keep_versions: int = 5
    update: Literal["full", "incremental"] = "full"  # a user with an adapter: retrain, or continue it
    incremental: IncrementalSettings = field(default_factory=IncrementalSettings)

    def __post_init__(self) -> None:
        if self.update == "incremental" and self.trainer != "per-user":
            raise ConfigError(f"users.update=incremental continues a user's adapter with the per-user trainer "
                              f"only, not users.trainer={self.trainer}: set users.trainer=per-user, or "
                              "users.update=full")
        if self.keep_versions < 1:
            raise ConfigError(f"users.keep_versions must be >= 1, got {self.keep_versions}")
        if self.max_failed_users < -1:
            raise ConfigError(f"users.max_failed_users must be >= 0 (-1: any number), got {self.max_failed_users}")
        if self.parallel_variants < 1:
            raise ConfigError(f"users.parallel_variants must be >= 1, got {self.parallel_variants}")
        if self.users_per_batch < 1:
            raise ConfigError(f"users.users_per_batch must be >= 1, got {self.users_per_batch}")
        if self.max_retries < 0:
            raise ConfigError(f"users.max_retries must be >= 0, got {self.max_retries}")
        if self.quantize == "nf4" and self.num_gpus_per_actor <= 0:
            raise ConfigError("users.quantize=nf4 needs GPU actors: bitsandbytes' 4-bit base runs on CUDA "
                              f"only, and users.num_gpus_per_actor={self.num_gpus_per_actor} trains on CPU "
                              "(set users.num_gpus_per_actor > 0, or users.quantize=none)")
        check_base_precision("users.base_precision", self.base_precision, self.num_gpus_per_actor > 0,
                             f"users.num_gpus_per_actor={self.num_gpus_per_actor}")
        check_kernels("users.kernels", self.kernels, self.num_gpus_per_actor > 0,
                      f"users.num_gpus_per_actor={self.num_gpus_per_actor}")
        if self.base_precision != "bf16" and self.quantize != "none":
            raise ConfigError(f"users.base_precision={self.base_precision} and users.quantize={self.quantize} "
                              "both replace the base's linear layers: pick one")
        if self.trainer == "batched":
            if self.peft.method != "lora":
                raise ConfigError(f"users.trainer=batched trains LoRA only, not users.peft.method="
                                  f"{self.peft.method}: use users.trainer=per-user")
            if self.batched.tokens_per_forward < self.optim.max_length:
                raise ConfigError(f"users.batched.tokens_per_forward={self.batched.tokens_per_forward} "
                                  f"is below users.optim.max_length={self.optim.max_length}")


@dataclass
class EvalStage:
    """Batch inference over the test users' queries for every method (jobs/evaluate.py)."""

    methods: list[str] = field(default_factory=lambda: [
        "non-personalized", "random-history", "rag-k1", "rag-k2", "rag-k4", "oppu", "rag-k1+oppu"])
    actors: int = 2
    users_per_batch: int = 2
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    generation_batch_size: int = 16
    max_prompt_tokens: int = 1024
    # greedy: every task's answer is generated greedily and parsed (the paper's way). labels: a
    # task with a label set (LaMP-1, 2N, 2M, 3) scores each label as the whole answer and takes the
    # one its metric rewards most (the likeliest for accuracy, the least expected absolute error
    # for MAE: oppu.tasks.decisions); generation tasks are still generated greedily.
    decoding: Literal["greedy", "labels"] = "greedy"
    label_batch_size: int = 64  # labels: (query, label) rows per forward pass
    # queries (all methods together) that may fail to be answered (a missing or corrupt adapter, an
    # actor that could not start) before evaluate fails, after writing metrics.json; -1: any number.
    # 0 by default: a failed query would score as an empty answer. Also `oppu evaluate --max-failed-queries N`.
    max_failed_queries: int = 0

    def __post_init__(self) -> None:
        if self.decoding not in ("greedy", "labels"):
            raise ConfigError(f"eval.decoding must be 'greedy' or 'labels', got {self.decoding!r}")
        if self.label_batch_size < 1:
            raise ConfigError(f"eval.label_batch_size must be >= 1, got {self.label_batch_size}")
        if self.max_failed_queries < -1:
            raise ConfigError(f"eval.max_failed_queries must be >= 0 (-1: any number), got {self.max_failed_queries}")


@dataclass
class ProfileSettings:
    """Who writes the textual user profiles of the ``profile`` flavour and the PAG methods."""

    writer: Literal["statistical", "hf", "openai"] = "statistical"
    model: str | None = None  # hf: instruction-tuned model id/path; openai: the endpoint's model name
    base_url: str | None = None  # openai: the endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key
    items_per_user: int = 10  # history items shown to an LLM writer (the reference samples 10)
    batch_size: int = 8  # hf: prompts per generation batch
    max_new_tokens: int = 128
    num_gpus: float = 0.0  # hf: GPUs of the Ray task that writes the profiles (0: on CPU)


@dataclass
class RaySettings:
    address: str | None = None  # None: RAY_ADDRESS, the cluster `ray start` made here, or a new local instance
    num_cpus: int | None = None  # for a new local instance only
