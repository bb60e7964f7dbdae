"""Load any Hugging Face causal LM from a local dir, a ``file://`` URI, any fsspec URI or a hub id.

A remote model (``s3://bucket/prefix/model``, ``memory://...``, ...) is downloaded once into
``$OPPU_CACHE_DIR/models/<sha256 of the URI>`` (default ``~/.cache/oppu``): only ``config.json``,
the tokenizer files and the weights, into a temporary directory that is renamed into place when
complete, so a reader never sees half a model; a file lock makes concurrent processes on one
machine share one download. The next call reuses it unless the remote files' names or sizes
changed. A named model (``smollm2-135m-instruct``) or a ``.gguf`` file is converted once into a
cached model directory (``oppu.models.sources``). A name without ``://`` that is not an existing
path is a hub id and goes to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from oppu import fsutil
from oppu.errors import ConfigError, OppuError
from oppu.models.sources import gguf_model_dir, is_gguf

# Files a causal LM needs at load time; weights in safetensors are preferred over .bin.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "chat_template.*")
SAFETENSORS_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
BIN_PATTERNS = ("*.bin", "pytorch_model.bin.index.json")
logger = logging.getLogger(__name__)
SOURCE_RECORD = ".oppu-source.json"  # remote name -> size of a cached download, to notice changes


def cache_root() -> Path:
    """``$OPPU_CACHE_DIR`` or ``~/.cache/oppu``: downloaded models and built tiny models live under it."""
    return Path(os.environ.get("OPPU_CACHE_DIR") or Path.home() / ".cache" / "oppu").expanduser()


def is_hub_id(uri: str | os.PathLike) -> bool:
    """A name like ``org/model``: no ``://``, not an existing path, not written as a path."""
    text = os.fspath(uri)
    return (not is_gguf(text) and "://" not in text and not Path(text).expanduser().exists()
            and not text.startswith(("/", ".", "~")) and text.count("/") <= 1)


def resolve_model_dir(uri: str | os.PathLike) -> Path:
    """The local directory holding ``config.json`` + weights for ``uri``.

    A local path or ``file://`` URI is used in place; another fsspec URI is downloaded into the
    cache; a named model or ``.gguf`` file is converted into the cache; a hub id is looked up with ``huggingface_hub.snapshot_download`` (which works offline
    from the hub cache).
    """
    text = os.fspath(uri)
    if is_gguf(text):
        return gguf_model_dir(text)
    if text.startswith("file://"):
        return _local_model_dir(Path(text.removeprefix("file://")), text)
    if "://" in text:
        return _download_cached(text)
    if is_hub_id(text):
        return _hub_snapshot(text)
    return _local_model_dir(Path(text).expanduser(), text)


def _local_model_dir(path: Path, uri: str) -> Path:
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise OppuError(f"no model at {uri!r}: {path} {what} (expected a Hugging Face model directory "
                        "with config.json and weights)")
    return path


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*CONFIG_FILES, *TOKENIZER_PATTERNS,
                                                                    *SAFETENSORS_PATTERNS]))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(repo_id, allow_patterns=[*CONFIG_FILES, *BIN_PATTERNS]))
        return snapshot
    except Exception as exc:  # hub errors are many types (offline, gated, missing repo)
        raise OppuError(f"no model at {repo_id!r}: not a local path and not found on the Hugging Face "
                        f"hub ({type(exc).__name__}: {exc})") from exc


def _wanted_files(names: list[str]) -> list[str]:
    def matching(patterns: tuple[str, ...]) -> list[str]:
        return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]

    weights = matching(SAFETENSORS_PATTERNS) or matching(BIN_PATTERNS)
    return sorted(set(matching(CONFIG_FILES) + matching(TOKENIZER_PATTERNS) + weights))


def _download_cached(uri: str, attempts: int = 3) -> Path:
    """A local copy of the model at remote ``uri`` (one per URI and machine, reused while the remote
    files keep their sizes). ``config.json`` is checked again after the download: a model replaced
    meanwhile (``fsutil.publish_dir`` removes it first and writes it last) is downloaded again."""
    fs, root = fsutil.filesystem(uri)
    root = root.rstrip("/")
    for _ in range(attempts):
        fs.invalidate_cache(root)
        try:
            listing = fs.ls(root, detail=True)
        except FileNotFoundError as exc:
            raise OppuError(f"no model at {uri!r}: nothing is stored there") from exc
        entries = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry
                   for entry in listing if entry.get("type") == "file"}
        sizes = {name: int(entry.get("size") or 0) for name, entry in entries.items()}
        if "config.json" not in sizes:
            raise OppuError(f"no model at {uri!r}: no config.json among {sorted(sizes)} (being replaced? "
                            "try again once its publish has finished)")
        wanted = {name: sizes[name] for name in _wanted_files(list(sizes))}
        target = _download_files(fs, root, uri, wanted)
        fs.invalidate_cache(root)
        try:
            unchanged = _version_of(fs.info(f"{root}/config.json")) == _version_of(entries["config.json"])
        except FileNotFoundError:
            unchanged = False
        if unchanged:
            return target
        logger.warning("the model at %s was replaced while it was being downloaded: downloading it again", uri)
    raise OppuError(f"the model at {uri!r} kept changing while it was being downloaded ({attempts} attempts)")


def _version_of(entry: dict) -> tuple:
    """What tells two listings of one object apart: size and, where the store gives them, its ETag
    and modification time."""
    return tuple(str(entry.get(key)) for key in ("size", "ETag", "LastModified", "mtime"))


def _download_files(fs, root: str, uri: str, wanted: dict[str, int]) -> Path:
    target = cache_root() / "models" / hashlib.sha256(uri.encode()).hexdigest()[:32]
    target.parent.mkdir(parents=True, exist_ok=True)
    # One download per model and machine: other processes (Ray workers) wait here, then reuse it.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached_files(target) == wanted:
            return target
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            for name in wanted:
                fs.get_file(f"{root}/{name}", str(staging / name))
            (staging / SOURCE_RECORD).write_text(json.dumps({"uri": uri, "files": wanted}, indent=1))
            if target.exists():  # an older download of this URI: the remote files changed since
                os.rename(target, staging.with_name(staging.name + "-stale"))
                shutil.rmtree(staging.with_name(staging.name + "-stale"))
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _cached_files(target: Path) -> dict[str, int] | None:
    try:
        return json.loads((target / SOURCE_RECORD).read_text()).get("files")
    except (OSError, ValueError):
        return None


def default_dtype(device: str):
    """float32 on CPU (bfloat16 matmuls are slow there), bfloat16 on an accelerator."""
    import torch

    return torch.float32 if str(device).startswith("cpu") else torch.bfloat16


def load_model(uri: str | os.PathLike, *, device: str = "cpu", dtype=None, quantize: str = "none"):
    """``(model, tokenizer)`` for ``uri``: model in eval mode on ``device``; tokenizer left-padding with a pad token.

    ``dtype`` is a ``torch.dtype``; by default float32 on CPU and bfloat16 elsewhere. A tokenizer
    without a pad token pads with EOS (the padding is masked, so which id it is does not matter).
    ``quantize="nf4"`` loads the linear weights in 4-bit NF4 for QLoRA, frozen, on the current CUDA
    device (``oppu.models.quantization``; ``ConfigError`` without CUDA or bitsandbytes).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = os.fspath(uri)
    model = None
    if quantize == "nf4":
        from oppu.models.quantization import load_base_4bit

        model = load_base_4bit(text)
    elif quantize != "none":
        raise ConfigError(f"quantize: {quantize!r} is not one of ['none', 'nf4']")
    source = text if is_hub_id(text) else resolve_model_dir(text)
    dtype = dtype if dtype is not None else default_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    except OSError as exc:
        raise OppuError(f"cannot load the model at {text!r} ({source}): {exc}") from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise OppuError(f"the tokenizer of {text!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
