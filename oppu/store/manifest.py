"""What a personal adapter is stored under and what its manifest records.

Layout::

    {root}/{task}/{base_fingerprint}/{variant}/{user}/{version}/
        adapter_config.json, adapter_model.safetensors, ..., manifest.json

``version`` is ``v{UTC yyyymmddTHHMMSSffffff}-{8 hex}``, so sorting names is sorting by time and
two writers of one key never pick the same folder. ``manifest.json`` (the sha256 of every other
file) is written last: a folder without it is not a version. Every part of a key, and every file
name a manifest lists, is checked before any path is built from it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from oppu.errors import AdapterIntegrityError, ConfigError
from oppu.ids import validate_user_id
from oppu.store.objects import canonical_json, sha256_hex

MANIFEST_NAME = "manifest.json"
LEASE_NAME = "_publishing.json"  # a publisher's claim on its version folder while it uploads
ROLLBACK_NAME = "_rollback.json"  # in a key's folder: the version a rollback made current
FORMAT_VERSION = 1

# A path component that can never be "." / "..", hidden, or the token store's "_auth".
TASK_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FINGERPRINT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VARIANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
VERSION_PATTERN = re.compile(r"v(\d{8}T\d{12})-[0-9a-f]{8}")
_VERSION_TIME_FORMAT = "%Y%m%dT%H%M%S%f"
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def check_component(name: str, value: object, pattern: re.Pattern[str]) -> str:
    """``value`` where it matches ``pattern``, else ``ConfigError`` naming the key's ``name`` part."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"invalid adapter {name} {str(value)[:64]!r}: must match {pattern.pattern}")
    return value


@dataclass(frozen=True)
class AdapterKey:
    """What an adapter is stored under; every part is checked before any path is built.

    A bad ``user`` raises ``UserIdError``; a bad task, fingerprint or variant ``ConfigError``.
    """

    task: str
    base_fingerprint: str
    variant: str
    user: str

    def __post_init__(self) -> None:
        check_component("task", self.task, TASK_PATTERN)
        check_component("base fingerprint", self.base_fingerprint, FINGERPRINT_PATTERN)
        check_component("variant", self.variant, VARIANT_PATTERN)
        object.__setattr__(self, "user", validate_user_id(self.user))

    def relative_path(self) -> str:
        return f"{self.task}/{self.base_fingerprint}/{self.variant}/{self.user}"

    def __str__(self) -> str:
        return self.relative_path()


@dataclass
class Manifest:
    """What ``manifest.json`` records about one adapter version.

    ``peft_config`` is the adapter's own ``adapter_config.json``; ``train_config`` the training
    config it was published with and ``config_hash`` that config's canonical-JSON sha256;
    ``data_hash`` identifies the user's training data and ``data_span`` describes it (item
    count, dates); ``files`` maps each file name to the sha256 hex of its bytes; ``created`` is
    ISO 8601 UTC.
    """

    user: str
    task: str
    variant: str
    base_fingerprint: str
    peft_method: str
    peft_config: dict[str, Any]
    train_config: dict[str, Any]
    config_hash: str
    data_hash: str
    data_span: dict[str, Any]
    metrics: dict[str, float]
    files: dict[str, str]
    created: str
    version: str
    format_version: int = FORMAT_VERSION

    @property
    def key(self) -> AdapterKey:
        return AdapterKey(self.task, self.base_fingerprint, self.variant, self.user)

    @property
    def trainer(self) -> str:
        """What made the version: ``per-user`` (the default trainer), ``batched``, ``import``, ...
        (recorded in ``train_config`` where it is not ``per-user``); ``per-user+incremental`` where
        it continued an older version (``train_config["update"]``; ``data_span["update"]`` names it)."""
        trainer = str(self.train_config.get("trainer", "per-user"))
        return f"{trainer}+incremental" if self.train_config.get("update") == "incremental" else trainer

    @property
    def prompt_format(self) -> str:
        """How the adapter's training prompts were rendered (``oppu.models.prompting``): serve it so.

        Recorded in ``train_config`` where it is not ``plain`` (manifests from before chat
        formats have none, and were all trained on plain prompts).
        """
        return str(self.train_config.get("prompt_format", "plain"))

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        """Parse a stored manifest; anything malformed is an ``AdapterIntegrityError`` naming ``where``."""
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise AdapterIntegrityError(f"{where}: manifest is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise AdapterIntegrityError(f"{where}: manifest is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n != "format_version" and n not in raw)
        if missing:
            raise AdapterIntegrityError(f"{where}: manifest lacks fields {missing}")
        format_version = raw.get("format_version", FORMAT_VERSION)
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise AdapterIntegrityError(
                f"{where}: manifest format_version {format_version!r} is not one this reader "
                f"(format {FORMAT_VERSION}) understands")
        files = raw["files"]
        if not isinstance(files, dict) or not files:
            raise AdapterIntegrityError(f"{where}: manifest 'files' must map file names to sha256")
        for name, digest in files.items():
            # Names become local paths in fetch(): a forged "../x" must never get that far.
            if not is_safe_file_name(name) or name in (MANIFEST_NAME, LEASE_NAME):
                raise AdapterIntegrityError(f"{where}: manifest lists an unsafe file name {name!r}")
            if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
                raise AdapterIntegrityError(f"{where}: manifest sha256 of {name!r} is {digest!r}")
        return cls(**{n: raw[n] for n in names if n in raw})


def is_safe_file_name(name: object) -> bool:
    """A relative POSIX path whose every part is a plain file name (no "..", no "/" at either end)."""
    return isinstance(name, str) and all(
        FILE_NAME_PATTERN.fullmatch(part) and part not in (".", "..") for part in name.split("/"))


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a training config (what ``find`` compares)."""
    try:
        return sha256_hex(canonical_json(config))
    except TypeError as exc:
        raise ConfigError(f"adapter training config is not JSON-serialisable: {exc}") from exc


def new_version_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"v{now.strftime(_VERSION_TIME_FORMAT)}-{secrets.token_hex(4)}"


def version_time(version: str) -> datetime:
    match = VERSION_PATTERN.fullmatch(version)
    if not match:
        raise ValueError(f"not an adapter version id: {version!r}")
    return datetime.strptime(match.group(1), _VERSION_TIME_FORMAT).replace(tzinfo=UTC)
