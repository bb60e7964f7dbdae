"""A user's adapter versions in a run's store: listed, rolled back, exported, imported.

    oppu adapters list     --run DIR --user U [--variant V]
    oppu adapters rollback --run DIR --user U --to VERSION [--variant V]
    oppu adapters export   --run DIR --user U --out DIR2 [--variant V] [--version X]
    oppu adapters import   --run DIR --user U --from DIR2 [--variant V]

A variant's adapters live under the fingerprint of the base it trains on (``RunConfig.variant_base``),
so the run's base must be there. ``export`` writes a standard PEFT folder (``adapter_config.json``,
``adapter_model.safetensors``; nothing else) that ``PeftModel.from_pretrained(base, DIR2)`` loads
and that vLLM and Ray Serve LLM load as one adapter of their one-folder-per-adapter layout; its
``base_model_name_or_path`` is the run's base URI. ``import`` checks a PEFT LoRA folder as a
serving replica would before it is ever requested (``serving.adapters.decode_adapter``: LoRA, rank
and target modules within the serving limits, finite weights; ``serving.slot_packing``: every
weight names a layer of the base and has its shape) and publishes it as a new, current version
(trainer ``import``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oppu import fsutil
from oppu.errors import AdapterError, AdapterIntegrityError, AdapterNotFound, ConfigError, DataError
from oppu.ids import validate_user_id
from oppu.run_config import RunConfig
from oppu.store import AdapterKey, AdapterStore, Manifest
from oppu.store.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
IMPORT_TRAINER = "import"


def base_uri(cfg: RunConfig, variant: str) -> str:
    """The base ``variant`` trains on, as the run configures it (a local path made absolute)."""
    uri = cfg.base_uri(cfg.variant_base(variant))
    return uri if fsutil.is_remote(uri) else os.path.abspath(fsutil.local_path(uri))


def adapter_key(cfg: RunConfig, user: str, variant: str) -> AdapterKey:
    """Where ``user``'s ``variant`` adapters are in ``cfg``'s store (``ConfigError`` without the base)."""
    from oppu.models import base_fingerprint

    uri = base_uri(cfg, variant)
    if not fsutil.exists(fsutil.join(uri, fsutil.MARKER_FILE)):
        raise ConfigError(f"variant {variant!r}: the run has no base at {uri} (oppu train-base makes it)")
    return AdapterKey(cfg.task, base_fingerprint(uri), variant, validate_user_id(user))


def version_row(manifest: Manifest, current: bool) -> dict[str, Any]:
    """One line of ``oppu adapters list``."""
    return {"version": manifest.version, "created": manifest.created, "trainer": manifest.trainer,
            "data_range": manifest.data_span, "current": current, "variant": manifest.variant}


def list_versions(cfg: RunConfig, user: str, variants: Sequence[str]) -> list[dict[str, Any]]:
    """Every complete version of ``user``'s adapter of each of ``variants``, oldest first; a version
    whose manifest cannot be read, and of several variants one whose base is not there, is left out
    with a warning. ``ConfigError`` when there is none."""
    store = AdapterStore(cfg.store_uri)
    rows = []
    for variant in variants:
        try:
            key = adapter_key(cfg, user, variant)
        except ConfigError as exc:
            if len(variants) == 1:
                raise
            logger.warning("leaving out %s", exc)
            continue
        current = store.latest(key)
        for version in store.versions(key):
            try:
                manifest = store.manifest(key, version)
            except (AdapterNotFound, AdapterIntegrityError) as exc:
                logger.warning("leaving out adapter %s version %s: %s", key, version, exc)
                continue
            rows.append(version_row(manifest, current is not None and manifest.version == current.version))
    if not rows:
        raise ConfigError(f"user {user!r} has no adapter of variant(s) {list(variants)} for task {cfg.task} "
                          f"on the run's base in {cfg.store_uri}")
    return rows


def rollback_version(cfg: RunConfig, user: str, variant: str, version: str) -> Manifest:
    """Make ``version`` of ``user``'s ``variant`` adapter current (``AdapterStore.rollback``);
    ``ConfigError`` for a version the store does not have."""
    key = adapter_key(cfg, user, variant)
    try:
        return AdapterStore(cfg.store_uri).rollback(key, version)
    except AdapterNotFound as exc:
        raise ConfigError(f"{exc} (oppu adapters list --run {cfg.run_dir} --user {user} shows the versions)") from None


def export_adapter(cfg: RunConfig, user: str, variant: str, out_uri: str, version: str | None = None) -> Manifest:
    """Write ``user``'s ``variant`` adapter (the current version, or ``version``), verified, as a
    PEFT folder at ``out_uri`` (a path or fsspec URI; it must hold no adapter yet); returns its
    manifest. ``adapter_config.json`` goes through PEFT's own config class, its
    ``base_model_name_or_path`` set to the run's base URI; the weights are the stored bytes."""
    from peft import PeftConfig

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if fsutil.exists(fsutil.join(out_uri, name)):
            raise ConfigError(f"--out: {out_uri} already holds {name}; export into a new folder")
    key = adapter_key(cfg, user, variant)
    try:
        manifest, files = AdapterStore(cfg.store_uri).read_files(key, version)
    except AdapterNotFound as exc:
        raise ConfigError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="oppu-export-") as tmp:
        stored, staged = Path(tmp) / "stored", Path(tmp) / "staged"
        stored.mkdir()
        (stored / ADAPTER_CONFIG).write_bytes(files[ADAPTER_CONFIG])
        peft_config = PeftConfig.from_pretrained(str(stored))
        peft_config.base_model_name_or_path = base_uri(cfg, variant)
        peft_config.inference_mode = True
        peft_config.save_pretrained(str(staged))
        fsutil.write_bytes(fsutil.join(out_uri, ADAPTER_WEIGHTS), files[ADAPTER_WEIGHTS])
        fsutil.write_bytes(fsutil.join(out_uri, ADAPTER_CONFIG), (staged / ADAPTER_CONFIG).read_bytes())
    return manifest


def check_importable(files: dict[str, bytes], key: AdapterKey, base_dir: str | Path, *,
                     max_lora_rank: int, target_modules: Sequence[str], where: str) -> None:
    """``AdapterError`` naming what a serving replica with these limits would refuse in the PEFT
    files ``files`` for ``key``'s base at ``base_dir``, checked by the replica's own code."""
    from oppu.serving.adapters import AdapterShape, decode_adapter
    from oppu.serving.slot_packing import SlotLayout, pack_peft_adapter

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if name not in files:
            extra = " (a .bin adapter: save it with safe_serialization=True)" if name == ADAPTER_WEIGHTS \
                and "adapter_model.bin" in files else ""
            raise AdapterError(f"{where}: no {name}{extra}")
    try:
        peft_config = json.loads(files[ADAPTER_CONFIG])
    except ValueError as exc:
        raise AdapterError(f"{where}: {ADAPTER_CONFIG} is not JSON: {exc}") from None
    if not isinstance(peft_config, dict):
        raise AdapterError(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    if MANIFEST_NAME in files:  # an oppu store version: it names the base it was trained on
        try:
            trained_on = json.loads(files[MANIFEST_NAME]).get("base_fingerprint")
        except (ValueError, AttributeError):
            trained_on = None
        if trained_on is not None and trained_on != key.base_fingerprint:
            raise AdapterError(f"{where}: its {MANIFEST_NAME} says it was trained on base {trained_on}; "
                               f"the run's base is {key.base_fingerprint}")
    probe = Manifest(user=key.user, task=key.task, variant=key.variant, base_fingerprint=key.base_fingerprint,
                     peft_method="lora", peft_config=peft_config, train_config={}, config_hash="", data_hash="",
                     data_span={}, metrics={}, files={}, created="", version="(import)")
    shape = AdapterShape(key.base_fingerprint, max_lora_rank, tuple(target_modules))
    try:
        loaded = decode_adapter(probe, files, shape)
        if not loaded.state_dict:
            raise AdapterError(f"{ADAPTER_WEIGHTS} holds no tensors")
        pack_peft_adapter(SlotLayout.of(_slot_model(base_dir, target_modules, max_lora_rank)),
                          loaded.state_dict, loaded.peft_config)
    except AdapterError as exc:
        raise AdapterError(f"{where}: refused for the run's base {key.base_fingerprint}, as serving would "
                           f"refuse it: {exc}") from None


def _slot_model(base_dir: str | Path, target_modules: Sequence[str], max_lora_rank: int):
    """The base's architecture with serving's LoRA slots, on the meta device (no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from oppu.models.multi_lora import inject_multi_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
        inject_multi_lora(model, list(target_modules), n_slots=1, rank=max_lora_rank, alpha=max_lora_rank)
    return model


def import_adapter(cfg: RunConfig, user: str, variant: str, source_uri: str, *, max_lora_rank: int,
                   target_modules: Sequence[str]) -> Manifest:
    """Check the PEFT LoRA folder at ``source_uri`` (``check_importable``; ``DataError`` naming what
    is wrong) and publish it as a new, current version of ``user``'s ``variant`` adapter; returns
    its manifest.

    The train config records ``trainer: import`` and, where the run's prompts are not plain, the
    run's prompt format (an imported adapter is prompted as the run's own); ``data_span`` is empty
    (its history is not known). An erased user is refused (``ConfigError``); ``users.keep_versions``
    applies as after training.
    """
    from oppu.erasure import is_tombstoned
    from oppu.models import resolve_model_dir
    from oppu.models.prompting import model_prompt_format
    from oppu.store.objects import sha256_hex

    key = adapter_key(cfg, user, variant)
    if is_tombstoned(cfg.store_uri, key.user):
        raise ConfigError(f"user {key.user!r} was erased (oppu users delete): not imported; `oppu users "
                          "restore` lifts that")
    files = _read_folder(source_uri)
    base_dir = resolve_model_dir(base_uri(cfg, variant))
    try:
        check_importable(files, key, base_dir, max_lora_rank=max_lora_rank, target_modules=target_modules,
                         where=source_uri)
    except AdapterError as exc:  # the input is bad, not the store
        raise DataError(str(exc)) from None
    config: dict[str, Any] = {"trainer": IMPORT_TRAINER, "variant": variant}
    prompt_format = model_prompt_format(cfg.prompt_format, base_dir)  # as training resolves it
    if prompt_format != "plain":
        config["prompt_format"] = prompt_format
    store = AdapterStore(cfg.store_uri, keep_versions=cfg.users.keep_versions)
    with tempfile.TemporaryDirectory(prefix="oppu-import-") as staged:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            (Path(staged) / name).write_bytes(files[name])
        manifest = store.publish(key, staged, data_hash=sha256_hex(files[ADAPTER_WEIGHTS]), config=config,
                                 peft_method="lora", data_span={}, metrics={})
    if is_tombstoned(cfg.store_uri, key.user):  # erased while the version was written
        store.delete_user(key.user)
        raise ConfigError(f"user {key.user!r} was erased while their adapter was imported: the version was "
                          "removed again")
    return manifest


def _read_folder(uri: str) -> dict[str, bytes]:
    """The files directly in the folder ``uri`` (a path or fsspec URI), by name."""
    fs, path = fsutil.filesystem(uri)
    if not fs.isdir(path):
        raise ConfigError(f"--from: no adapter folder at {uri}")
    return {entry.rstrip("/").rsplit("/", 1)[-1]: fs.cat_file(entry)
            for entry in fs.ls(path, detail=False) if fs.isfile(entry)}

