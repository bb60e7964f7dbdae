"""The tiny default base model, built locally when there is no network and no GPU.

``build_tiny_base`` stands in for downloading a pretrained LLM: it trains a byte-level BPE
tokenizer on the corpus (the synthetic LaMP texts), builds a small ``LlamaForCausalLM`` and
pretrains all of its parameters briefly as a causal LM on the packed corpus, so that the later
task adaptation and personal LoRAs start from a model that already knows the corpus's words.
The result is an ordinary Hugging Face model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ...) that ``load_model`` and ``AutoModelForCausalLM.from_pretrained`` read.

A build is keyed by a hash of (config, corpus, seed), written to ``oppu-build.json`` in the
output directory: a second call with the same inputs returns at once. Finished builds are also
kept under ``$OPPU_CACHE_DIR/tiny/<hash>`` so a fresh output directory (a second quickstart)
is filled by a copy instead of another pretraining run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from oppu.errors import ConfigError
from oppu.models.loading import cache_root

log = logging.getLogger(__name__)

BUILD_RECORD = "oppu-build.json"
BUILD_FORMAT_VERSION = 1  # bump when the build procedure changes, so old cached builds are not reused
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_NOT_IN_BUILD_HASH = ("log_every_steps",)  # fields that do not change the built model


@dataclass(frozen=True)
class TinyModelConfig:
    """Size and pretraining budget of the tiny base model.

    Sized on a 2-core CPU: forward+backward+AdamW on 16x128 tokens ran at about 6000 tokens per
    CPU-second for hidden 128 x 2 layers, 3100 for 128 x 4, 2000 for 192 x 4 and 1300 for 256 x 4.
    The default (192 x 4, 1.8M parameters; 140 steps x 8 x 128 = 143k tokens) brings the synthetic
    LaMP-2M corpus (3.9 MB, 830k tokens) to a loss of 0.68 (0.70 held out): about 70 CPU-seconds
    at one thread (126 s wall on the busy shared machine), where 80 steps of 16 stopped at 0.98;
    128 x 4 reaches the same loss at half the cost.
    """

    vocab_size: int = 3072  # most tokens the BPE tokenizer learns (256 byte symbols + 4 specials + merges)
    min_token_frequency: int = 2  # a merge must occur this often in the corpus to become a token
    tokenizer_max_chars: int = 1_000_000  # the tokenizer learns from evenly spaced documents up to this much text
    hidden_size: int = 192  # width of the residual stream
    num_layers: int = 4  # decoder blocks
    num_heads: int = 6  # attention heads (head size = hidden_size / num_heads)
    num_kv_heads: int = 2  # key/value heads (grouped-query attention, as in Llama 2/3)
    intermediate_size: int = 512  # width of the SwiGLU MLP
    max_position_embeddings: int = 2048  # longest sequence the model accepts (RoPE, so this costs nothing)
    rope_theta: float = 10000.0  # RoPE base frequency
    pretrain_steps: int = 140  # optimizer steps of causal-LM pretraining
    pretrain_batch_size: int = 8  # sequences per step
    pretrain_seq_len: int = 128  # tokens per sequence, cut at random offsets from the packed corpus
    pretrain_lr: float = 3e-3  # peak AdamW learning rate
    pretrain_warmup_steps: int = 10  # linear warmup, then cosine decay to zero
    pretrain_weight_decay: float = 0.01  # AdamW weight decay
    heldout_fraction: float = 0.02  # tail of the packed corpus kept out of pretraining to measure loss on
    num_threads: int = 0  # torch CPU threads while pretraining; 0 = every core this process may use
    log_every_steps: int = 25  # print loss and tokens/s this often

    def __post_init__(self) -> None:
        for name in ("vocab_size", "tokenizer_max_chars", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "max_position_embeddings", "pretrain_batch_size",
                     "pretrain_seq_len", "log_every_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.vocab_size < 260 + len(SPECIAL_TOKENS):
            raise ConfigError(f"vocab_size: must leave room beyond the 256 byte symbols, got {self.vocab_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads="
                              f"{self.num_kv_heads}: heads must divide hidden_size and kv heads must divide heads")
        if self.pretrain_steps < 0 or self.num_threads < 0:
            raise ConfigError(f"pretrain_steps={self.pretrain_steps}, num_threads={self.num_threads}: "
                              "must not be negative")
        if not 0 <= self.heldout_fraction < 0.5:
            raise ConfigError(f"heldout_fraction: must be in [0, 0.5), got {self.heldout_fraction!r}")
        if self.pretrain_seq_len > self.max_position_embeddings:
            raise ConfigError(f"pretrain_seq_len={self.pretrain_seq_len} exceeds max_position_embeddings="
                              f"{self.max_position_embeddings}")


def build_hash(corpus: Sequence[str], config: TinyModelConfig, seed: int) -> str:
    """The cache key of a build: sha256 over the build format, the config, the seed and the corpus."""
    corpus_digest = hashlib.sha256()
    for text in corpus:
        data = text.encode()
        corpus_digest.update(len(data).to_bytes(8, "big") + data)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_BUILD_HASH}
    key = {"format": BUILD_FORMAT_VERSION, "config": settings, "seed": seed, "corpus": corpus_digest.hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _completed_build(model_dir: Path, key: str) -> dict | None:
    try:
        record = json.loads((model_dir / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    complete = record.get("build_hash") == key and all(
        (model_dir / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    return record if complete else None


def build_tiny_base(corpus: Sequence[str], out_dir: str | os.PathLike, config: TinyModelConfig | None = None,
                    seed: int = 0, *, use_cache: bool = True) -> Path:
    """Build (or reuse) the tiny pretrained base model in ``out_dir`` and return ``out_dir``.

    ``use_cache=False`` skips ``$OPPU_CACHE_DIR/tiny``, both reading and writing it.
    """
    config = config or TinyModelConfig()
    out_dir = Path(out_dir)
    corpus = [text for text in corpus if text]
    if not corpus:
        raise ConfigError("build_tiny_base: the corpus has no text to train the tokenizer and model on")
    key = build_hash(corpus, config, seed)
    if _completed_build(out_dir, key):
        return out_dir

    cached = cache_root() / "tiny" / key
    if use_cache and _completed_build(cached, key):
        log.info("[tiny-base] reusing the cached build %s", cached)
        _install(cached, out_dir)
        return out_dir

    staging_parent = cached.parent if use_cache else out_dir.parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=staging_parent))
    try:
        _build_into(staging, corpus, config, seed, key)
        if use_cache:
            _publish(staging, cached)
            _install(cached, out_dir)
        else:
            _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished build into the cache; if another process got there first, keep theirs."""
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / BUILD_RECORD).is_file():
            shutil.rmtree(target, ignore_errors=True)  # an unfinished leftover: replace it
            os.rename(staging, target)


def _install(source: Path, out_dir: Path) -> None:
    """Copy a finished build into ``out_dir`` so that no reader ever sees half a model.

    A new ``out_dir`` appears by a rename of a complete copy; into an existing one the files are
    copied with ``config.json`` and then the build record last, since callers take a directory
    with ``config.json`` (and this module one with the record) as a finished model.
    """
    files = [p for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        for path in files:
            shutil.copy2(path, staging / path.name)
        try:
            os.rename(staging, out_dir)
            return
        except OSError:  # created meanwhile: fall through and copy into it
            shutil.rmtree(staging, ignore_errors=True)
    for name in (BUILD_RECORD, "config.json"):
        (out_dir / name).unlink(missing_ok=True)
    last = ("config.json", BUILD_RECORD)
    for path in sorted(files, key=lambda p: last.index(p.name) + 1 if p.name in last else 0):
        shutil.copy2(path, out_dir / path.name)


def train_tokenizer(corpus: Sequence[str], config: TinyModelConfig):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus``.

    Byte-level BPE splits on whitespace and punctuation (GPT-2's pattern, a space stays glued to
    the word after it) and round-trips any text exactly, with no unknown tokens. Like Llama's,
    it puts BOS in front when asked for special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_token_frequency,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    sample = _evenly_spaced_sample(corpus, config.tokenizer_max_chars)
    backend.train_from_iterator(sample, trainer=trainer, length=len(sample))
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=config.max_position_embeddings,
                                        padding_side="left", **SPECIAL_TOKENS)
    return tokenizer


def _evenly_spaced_sample(corpus: Sequence[str], max_chars: int) -> list[str]:
    """Every k-th document, k chosen so the sample holds about ``max_chars`` characters."""
    total_chars = sum(map(len, corpus))
    stride = max(1, math.ceil(total_chars / max_chars))
    return list(corpus[::stride])


def _packed_stream(corpus: Sequence[str], tokenizer):
    import torch

    ids: list[int] = []
    for encoded in tokenizer(list(corpus), add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _build_into(out: Path, corpus: list[str], config: TinyModelConfig, seed: int, key: str) -> None:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
    try:
        tokenizer = train_tokenizer(corpus, config)
        stream = _packed_stream(corpus, tokenizer)
        tokenizer_s = time.perf_counter() - started
        heldout_tokens = int(len(stream) * config.heldout_fraction)
        train_stream, heldout_stream = stream[:len(stream) - heldout_tokens], stream[len(stream) - heldout_tokens:]
        if len(train_stream) <= config.pretrain_seq_len:
            raise ConfigError(f"the corpus has only {len(train_stream)} training tokens; pretrain_seq_len="
                              f"{config.pretrain_seq_len} needs more")
        log.info("[tiny-base] tokenizer: %d tokens, corpus %d tokens (%.2f chars/token), %.1fs", len(tokenizer),
                 len(stream), sum(map(len, corpus)) / len(stream), tokenizer_s)

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        n_params = sum(p.numel() for p in model.parameters())
        pretrain = _pretrain(model, train_stream, config, seed)
        heldout_loss = _mean_loss(model, heldout_stream, config.pretrain_seq_len)

        model.eval()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        record = {
            "build_hash": key, "format": BUILD_FORMAT_VERSION, "seed": seed, "config": dataclasses.asdict(config),
            "corpus": {"documents": len(corpus), "characters": sum(map(len, corpus)), "tokens": len(stream),
                       "heldout_tokens": heldout_tokens},
            "vocab_size": len(tokenizer), "parameters": n_params, **pretrain, "heldout_loss": heldout_loss,
            "tokenizer_seconds": round(tokenizer_s, 2), "total_seconds": round(time.perf_counter() - started, 2),
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        (out / BUILD_RECORD).write_text(json.dumps(record, indent=1))
        log.info("[tiny-base] built %.2fM parameters in %.0fs; final train loss %s, held-out loss %s",
                 n_params / 1e6, record["total_seconds"], pretrain["final_train_loss"], heldout_loss)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(model, stream, config: TinyModelConfig, seed: int) -> dict:
    """Causal-LM pretraining on random windows of the packed token stream; returns loss and speed."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.95),
                                  weight_decay=config.pretrain_weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(config.pretrain_warmup_steps, config.pretrain_steps),
                                               max(config.pretrain_steps, 1))
    windows = torch.Generator().manual_seed(seed)
    last_start = len(stream) - config.pretrain_seq_len
    window = torch.arange(config.pretrain_seq_len)
    losses: list[float] = []
    tokens_per_step = config.pretrain_batch_size * config.pretrain_seq_len
    started = log_started = time.perf_counter()
    cpu_started = time.process_time()
    for step in range(1, config.pretrain_steps + 1):
        starts = torch.randint(0, last_start + 1, (config.pretrain_batch_size, 1), generator=windows)
        batch = stream[starts + window]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % config.log_every_steps == 0 or step == config.pretrain_steps:
            now = time.perf_counter()
            steps_in_window = step % config.log_every_steps or config.log_every_steps
            recent = losses[-steps_in_window:]
            log.info("[tiny-base] step %d/%d loss %.3f %.0f tokens/s", step, config.pretrain_steps,
                     sum(recent) / len(recent), steps_in_window * tokens_per_step / (now - log_started))
            log_started = now
    seconds = time.perf_counter() - started
    tail = losses[-min(len(losses), config.log_every_steps):]
    return {
        "pretrain_seconds": round(seconds, 2),
        "pretrain_cpu_seconds": round(time.process_time() - cpu_started, 2),  # wall time on an idle machine, 1 thread
        "pretrain_tokens_per_s": round(config.pretrain_steps * tokens_per_step / seconds) if losses else None,
        "initial_train_loss": round(losses[0], 4) if losses else None,
        "final_train_loss": round(sum(tail) / len(tail), 4) if tail else None,
    }


def _mean_loss(model, stream, seq_len: int) -> float | None:
    """Mean next-token loss over consecutive ``seq_len`` windows of ``stream`` (None when too short)."""
    import torch

    n_windows = len(stream) // seq_len
    if n_windows == 0:
        return None
    model.eval()
    with torch.inference_mode():
        batch = stream[:n_windows * seq_len].view(n_windows, seq_len)
        total = sum(model(input_ids=chunk, labels=chunk).loss.item() * len(chunk) for chunk in batch.split(16))
    return None if math.isnan(total) else round(total / n_windows, 4)
