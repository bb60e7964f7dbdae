"""Versioned, verifiable personal adapters under one URI root.

Layout::

    {root}/{task}/{base_fingerprint}/{variant}/{user}/{version}/
        adapter_config.json, adapter_model.safetensors, ..., manifest.json

``version`` is ``v{UTC yyyymmddTHHMMSSffffff}-{8 hex}``, so sorting names is sorting by time and
two writers of one key never pick the same folder. ``manifest.json`` (the sha256 of every other
file) is written last: a folder without it is not a version, and a reader refuses a version whose
files are missing or differ from their hashes.

Races and damage (issue #15):

- A publisher holds a lease on its folder while it uploads (``_publishing.json``: when it expires,
  renewed as files go up, ``AdapterStore(publish_lease_s=...)``); ``gc_incomplete`` never removes
  a folder under an unexpired lease, and checks again just before removing. Before writing the
  manifest the publisher lists its folder: a file that vanished (a gc that ran anyway) fails the
  publish, so no manifest ever names a file that is not there at that moment.
- Readers skip broken versions instead of failing on them: ``latest`` is the newest version whose
  manifest parses and names its folder and whose files all exist; ``read_files``/``fetch`` without
  a version fall back to the newest version whose files match their hashes; ``find`` (the
  skip-existing check of training) treats a corrupt, incomplete or tampered version as absent, so
  the next run retrains and republishes the user. Each skip is a warning naming the manifest.

Which version is served, and how many are kept (issue #17):

- The *current* version of a key is its newest usable one, unless a rollback said otherwise:
  ``rollback(key, version)`` writes ``_rollback.json`` in the key's folder (atomically, like a
  manifest), naming the version made current and the newest version at that moment; versions
  after the first and up to the second are passed over by ``latest`` and ``read_files`` from then
  on. A version published later is newer than both, so it is current again; and a broken current
  version falls back to older ones, never to the versions rolled back from.
- ``AdapterStore(keep_versions=K)`` keeps the newest K complete versions of a key: after each
  successful publish the older ones go (manifest first), except the current one. ``prune`` does
  it on demand. Without ``keep_versions`` every version is kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem

from oppu.errors import AdapterError, AdapterIntegrityError, AdapterNotFound, ConfigError
from oppu.ids import validate_user_id
from oppu.store.objects import canonical_json, list_files, open_root, sha256_hex, write_atomic

MANIFEST_NAME = "manifest.json"
LEASE_NAME = "_publishing.json"  # a publisher's claim on its version folder while it uploads
ROLLBACK_NAME = "_rollback.json"  # in a key's folder: the version a rollback made current
FORMAT_VERSION = 1
DEFAULT_PUBLISH_LEASE_S = 900.0

logger = logging.getLogger(__name__)

# A path component that can never be "." / "..", hidden, or the token store's "_auth".
TASK_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FINGERPRINT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VARIANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
VERSION_PATTERN = re.compile(r"v(\d{8}T\d{12})-[0-9a-f]{8}")
_VERSION_TIME_FORMAT = "%Y%m%dT%H%M%S%f"
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def _check_component(name: str, value: object, pattern: re.Pattern[str]) -> str:
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
        _check_component("task", self.task, TASK_PATTERN)
        _check_component("base fingerprint", self.base_fingerprint, FINGERPRINT_PATTERN)
        _check_component("variant", self.variant, VARIANT_PATTERN)
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
            if not _is_safe_file_name(name) or name in (MANIFEST_NAME, LEASE_NAME):
                raise AdapterIntegrityError(f"{where}: manifest lists an unsafe file name {name!r}")
            if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
                raise AdapterIntegrityError(f"{where}: manifest sha256 of {name!r} is {digest!r}")
        return cls(**{n: raw[n] for n in names if n in raw})


def _is_safe_file_name(name: object) -> bool:
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


class AdapterStore:
    """Publish, list, verify, fetch and delete personal adapters under ``root_uri``.

    ``root_uri`` is a local path, ``file://...`` or ``s3://bucket/prefix`` (endpoint and
    credentials from ``storage_options`` or the ``AWS_*`` environment). Calls block on I/O.

    ``publish_lease_s``: how long a publisher's lease on its version folder lasts (renewed after
    each file that took a quarter of it); ``gc_incomplete`` leaves a leased folder alone. It must
    exceed the longest single file upload plus the clock skew between writer and collector.

    ``keep_versions``: after each successful publish, delete all but the newest ``keep_versions``
    complete versions of the key, never the current one (``prune``); None keeps every version.
    """

    def __init__(self, root_uri: str, storage_options: dict[str, Any] | None = None, *,
                 publish_lease_s: float = DEFAULT_PUBLISH_LEASE_S, keep_versions: int | None = None):
        if publish_lease_s <= 0:
            raise ConfigError(f"publish_lease_s must be > 0, got {publish_lease_s}")
        if keep_versions is not None and keep_versions < 1:
            raise ConfigError(f"keep_versions must be >= 1 (or None: keep all), got {keep_versions}")
        self.root_uri = root_uri
        self.publish_lease_s = publish_lease_s
        self.keep_versions = keep_versions
        self._fs, self._root = open_root(root_uri, storage_options)
        # (key path, version) whose files failed their hashes in this process: latest() skips them
        self._broken: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"AdapterStore({self.root_uri!r})"

    # -- writing ---------------------------------------------------------------------------

    def publish(self, key: AdapterKey, adapter_dir: str | Path, *, data_hash: str,
                config: dict[str, Any], peft_method: str, data_span: dict[str, Any],
                metrics: dict[str, float]) -> Manifest:
        """Upload every file of the PEFT directory ``adapter_dir`` as a new version of ``key``.

        The folder is leased while files go up (``gc_incomplete`` leaves it alone); the manifest
        is written only once a fresh listing shows every uploaded file, else ``AdapterError``.
        The new version is current (newer than any rollback's); with ``keep_versions`` the key's
        oldest versions beyond it are deleted afterwards (a failure there is a warning only).
        """
        adapter_dir = Path(adapter_dir)
        peft_config_path = adapter_dir / "adapter_config.json"
        if not peft_config_path.is_file():
            raise AdapterError(f"cannot publish {adapter_dir} as adapter {key}: it is not a PEFT "
                               f"adapter directory (no adapter_config.json)")
        train_config_hash = config_hash(config)
        local_files = []
        for local_file in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
            name = local_file.relative_to(adapter_dir).as_posix()
            if name in (MANIFEST_NAME, LEASE_NAME):
                continue
            if not _is_safe_file_name(name):
                raise AdapterError(f"{adapter_dir}: cannot publish file {name!r} of adapter {key}: "
                                   f"names must match {FILE_NAME_PATTERN.pattern}")
            local_files.append((name, local_file))
        version = new_version_id()
        version_path = f"{self._key_path(key)}/{version}"
        lease_path = f"{version_path}/{LEASE_NAME}"
        renewed_at = self._renew_lease(lease_path)
        file_hashes: dict[str, str] = {}
        for name, local_file in local_files:
            # Hash the very bytes uploaded, so a file changing under us cannot desync the two.
            data = local_file.read_bytes()
            if name.endswith(".safetensors"):
                _refuse_nonfinite(key, adapter_dir, name, data)
            file_hashes[name] = sha256_hex(data)
            self._fs.pipe_file(f"{version_path}/{name}", data)
            if _now_s() - renewed_at > self.publish_lease_s / 4:
                renewed_at = self._renew_lease(lease_path)
        present = {path[len(version_path) + 1:] for path in list_files(self._fs, version_path)}
        vanished = sorted(set(file_hashes) - present)
        if vanished or LEASE_NAME not in present:
            raise AdapterError(
                f"adapter {key} version {version}: {vanished or [LEASE_NAME]} vanished while it was being "
                f"published (a gc_incomplete ran over the folder: is the publish lease of "
                f"{self.publish_lease_s:.0f}s shorter than the upload?); no manifest was written, "
                f"publish again")
        manifest = Manifest(
            user=key.user, task=key.task, variant=key.variant, base_fingerprint=key.base_fingerprint,
            peft_method=peft_method, peft_config=json.loads(peft_config_path.read_text()),
            train_config=config, config_hash=train_config_hash, data_hash=data_hash,
            data_span=data_span, metrics=metrics, files=file_hashes,
            created=datetime.now(UTC).isoformat(), version=version)
        write_atomic(self._fs, f"{version_path}/{MANIFEST_NAME}", manifest.to_json())
        try:
            self._fs.rm_file(lease_path)
        except FileNotFoundError:
            pass
        if self.keep_versions is not None:
            try:
                self.prune(key, self.keep_versions)
            except OSError as exc:  # the version is published; the old ones go after the next publish
                logger.warning("adapter %s: published %s, but deleting versions beyond the newest %d "
                               "failed: %s", key, version, self.keep_versions, exc)
        return manifest

    def _renew_lease(self, lease_path: str) -> float:
        """(Re)write the lease of a folder being published; returns when (``_now_s``)."""
        now = _now_s()
        expires = datetime.fromtimestamp(now + self.publish_lease_s, UTC).isoformat()
        write_atomic(self._fs, lease_path, canonical_json({"expires": expires}))
        return now

    # -- reading ---------------------------------------------------------------------------

    def versions(self, key: AdapterKey) -> list[str]:
        """Complete versions of ``key`` (those with a manifest), oldest first."""
        key_path = self._key_path(key)
        return sorted(version for user, version in _complete_versions(self._fs, key_path, depth=1))

    def manifest(self, key: AdapterKey, version: str) -> Manifest:
        """The manifest of one version; ``AdapterNotFound`` if it is not complete."""
        if not VERSION_PATTERN.fullmatch(version):
            raise AdapterNotFound(f"{key}: {version!r} is not a version id")
        path = f"{self._key_path(key)}/{version}/{MANIFEST_NAME}"
        try:
            data = self._fs.cat_file(path)
        except FileNotFoundError as exc:
            raise AdapterNotFound(f"{key}: no complete version {version}") from exc
        manifest = Manifest.from_json(data, where=f"adapter {key} version {version} ({path})")
        recorded = (manifest.task, manifest.base_fingerprint, manifest.variant, manifest.user,
                    manifest.version)
        expected = (key.task, key.base_fingerprint, key.variant, key.user, version)
        if recorded != expected:
            raise AdapterIntegrityError(
                f"adapter {key} version {version}: manifest describes "
                f"{'/'.join(recorded)}, not the folder it is in ({path})")
        return manifest

    def latest(self, key: AdapterKey) -> Manifest | None:
        """The manifest of the newest usable version, or None when there is none.

        Usable: its manifest parses and describes its folder, and every file it lists exists
        (hashes are checked when the files are read; a version whose hashes failed in this
        process is skipped too). Older versions stand in for broken newer ones, with a warning.
        This is the *current* version, the one served: versions a rollback passed over are skipped.
        """
        listing, rolled_back = self._listing(key)
        for manifest in self._usable_manifests(key, listing):
            if rolled_back is None or not rolled_back.passes_over(manifest.version):
                return manifest
        return None

    def find(self, key: AdapterKey, data_hash: str, config_hash: str, *,
             verify: bool = True) -> Manifest | None:
        """The newest usable version trained on the same data and config (a rerun may skip it).

        A corrupt or incomplete version counts as absent (a warning names it), so the user is
        trained and published again. ``verify`` also reads the candidate's files and checks
        their sha256 (adapters are small), so a tampered one is retrained too.
        """
        for manifest in self._usable_manifests(key, self._listing(key)[0]):
            if manifest.data_hash != data_hash or manifest.config_hash != config_hash:
                continue
            if verify:
                try:
                    self._verified_files(key, manifest)
                except AdapterIntegrityError as exc:
                    logger.warning("treating adapter %s version %s as absent: %s", key, manifest.version, exc)
                    continue
            return manifest
        return None

    def read_files(self, key: AdapterKey, version: str | None = None
                   ) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest and the verified bytes of every file of a version.

        Default: the current version (``latest``'s) when it verifies, else the newest older one
        that does (a warning names each one skipped); when none verifies, the first one's error is
        raised. A named ``version`` is strict.
        """
        if version is not None:
            manifest = self.manifest(key, version)
            return manifest, self._verified_files(key, manifest)
        first_error: AdapterIntegrityError | None = None
        listing, rolled_back = self._listing(key)
        for candidate in sorted((v for v, names in listing.items() if MANIFEST_NAME in names), reverse=True):
            if rolled_back is not None and rolled_back.passes_over(candidate):
                continue
            try:
                manifest = self.manifest(key, candidate)
                return manifest, self._verified_files(key, manifest)
            except AdapterNotFound:
                continue  # deleted meanwhile
            except AdapterIntegrityError as exc:
                logger.warning("skipping adapter %s version %s: %s", key, candidate, exc)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        raise AdapterNotFound(f"no complete adapter version for {key} in {self.root_uri}")

    def _verified_files(self, key: AdapterKey, manifest: Manifest) -> dict[str, bytes]:
        """Every file of ``manifest``'s version, each checked against its sha256."""
        key_path = self._key_path(key)
        version_path = f"{key_path}/{manifest.version}"
        paths = {name: f"{version_path}/{name}" for name in manifest.files}
        fetched = self._fs.cat(list(paths.values()), on_error="return")
        files: dict[str, bytes] = {}
        try:
            for name, expected_sha in manifest.files.items():
                data = fetched.get(paths[name], FileNotFoundError(paths[name]))
                if isinstance(data, FileNotFoundError):
                    raise AdapterIntegrityError(
                        f"adapter {key} version {manifest.version}: file {name!r} listed in the "
                        f"manifest is missing ({paths[name]})")
                if isinstance(data, Exception):
                    raise data
                actual_sha = sha256_hex(data)
                if actual_sha != expected_sha:
                    raise AdapterIntegrityError(
                        f"adapter {key} version {manifest.version}: file {name!r} has sha256 "
                        f"{actual_sha}, the manifest says {expected_sha} ({paths[name]})")
                files[name] = data
        except AdapterIntegrityError:
            self._broken.add((key_path, manifest.version))
            raise
        return files

    def _listing(self, key: AdapterKey) -> tuple[dict[str, set[str]], _RolledBack | None]:
        """One fresh listing of ``key``'s folder: the file names of each version folder, and the
        key's rollback record (read only where the listing shows one)."""
        key_path = self._key_path(key)
        listing: dict[str, set[str]] = {}
        has_rollback = False
        for file_path in list_files(self._fs, key_path):
            parts = file_path[len(key_path) + 1:].split("/", 1)
            if len(parts) == 2 and VERSION_PATTERN.fullmatch(parts[0]):
                listing.setdefault(parts[0], set()).add(parts[1])
            has_rollback = has_rollback or parts == [ROLLBACK_NAME]
        return listing, self._rolled_back(key) if has_rollback else None

    def _usable_manifests(self, key: AdapterKey, listing: dict[str, set[str]]):
        """Manifests of ``key``'s versions in ``listing`` (``_listing``'s), newest first, skipping
        (with a warning) any version whose manifest is corrupt or names another folder, whose
        listed files are not all there, or whose hashes failed in this process."""
        key_path = self._key_path(key)
        for version in sorted((v for v, names in listing.items() if MANIFEST_NAME in names), reverse=True):
            if (key_path, version) in self._broken:
                continue
            try:
                manifest = self.manifest(key, version)
            except AdapterNotFound:
                continue  # deleted since the listing
            except AdapterIntegrityError as exc:
                logger.warning("skipping adapter %s version %s: %s", key, version, exc)
                continue
            missing = sorted(set(manifest.files) - listing[version])
            if missing:
                logger.warning("skipping adapter %s version %s: files %s listed in its manifest are "
                               "missing (%s/%s)", key, version, missing, key_path, version)
                continue
            yield manifest

    def rollback(self, key: AdapterKey, version: str) -> Manifest:
        """Make ``version`` (complete, its files matching their hashes) the current version of ``key``.

        Writes ``_rollback.json`` (the version, and the newest version now) in one atomic write;
        versions after ``version`` up to that newest one are passed over from then on, by every
        reader of the store. A later publish is current again. Raises ``AdapterNotFound`` for a
        version that is not there, ``AdapterIntegrityError`` for one whose files do not verify, and
        ``AdapterError`` when a newer version was published meanwhile (that one is current).
        """
        manifest = self.manifest(key, version)
        self._verified_files(key, manifest)
        newest = self.versions(key)[-1]
        record = {"version": version, "passes_over_through": newest, "at": datetime.now(UTC).isoformat()}
        write_atomic(self._fs, f"{self._key_path(key)}/{ROLLBACK_NAME}", canonical_json(record))
        current = self.latest(key)
        if current is None or current.version != version:
            raise AdapterError(f"adapter {key}: rolled back to {version}, but "
                               f"{current.version if current else 'no version'} is current: a newer "
                               f"version was published meanwhile (roll back again to undo it)")
        return manifest

    def prune(self, key: AdapterKey, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` complete versions of ``key``, never the current one;
        returns the versions deleted. Each goes manifest first, so readers stop seeing it before
        its files disappear. Folders without a manifest are ``gc_incomplete``'s."""
        if keep < 1:
            raise ConfigError(f"keep must be >= 1, got {keep}")
        versions = self.versions(key)
        if len(versions) <= keep:
            return []
        current = self.latest(key)
        kept = set(versions[-keep:]) | ({current.version} if current is not None else set())
        doomed = [version for version in versions if version not in kept]
        key_path = self._key_path(key)
        for version in doomed:
            try:
                self._fs.rm_file(f"{key_path}/{version}/{MANIFEST_NAME}")
                self._fs.rm(f"{key_path}/{version}", recursive=True)
            except FileNotFoundError:
                pass  # another pruner got there first
        if doomed:
            logger.info("adapter %s: deleted %d version(s) beyond the newest %d", key, len(doomed), keep)
        return doomed

    def _rolled_back(self, key: AdapterKey) -> _RolledBack | None:
        """What ``key``'s ``_rollback.json`` says (None without one; an unreadable one is ignored
        with a warning, so the newest version is current)."""
        path = f"{self._key_path(key)}/{ROLLBACK_NAME}"
        try:
            raw = json.loads(self._fs.cat_file(path))
            rolled_back = _RolledBack(raw["version"], raw["passes_over_through"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable rollback record %s: %s", path, exc)
            return None
        if not (VERSION_PATTERN.fullmatch(str(rolled_back.version))
                and VERSION_PATTERN.fullmatch(str(rolled_back.through))):
            logger.warning("ignoring the rollback record %s: it names no version ids", path)
            return None
        return rolled_back

    def fetch(self, key: AdapterKey, dest_dir: str | Path | None = None,
              version: str | None = None) -> Path:
        """Download a verified version into ``dest_dir`` (default: a new temporary directory).

        Nothing is written unless every file matched its hash, so ``dest_dir`` never holds a
        half-verified adapter. The directory loads with ``PeftModel.from_pretrained``.
        """
        manifest, files = self.read_files(key, version)
        dest = Path(dest_dir) if dest_dir is not None else Path(
            tempfile.mkdtemp(prefix=f"oppu-adapter-{key.user}-"))
        for name, data in files.items():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (dest / MANIFEST_NAME).write_bytes(manifest.to_json())
        return dest

    def users(self, task: str, base_fingerprint: str, variant: str) -> list[str]:
        """Users with at least one complete adapter version under (task, base, variant)."""
        _check_component("task", task, TASK_PATTERN)
        _check_component("base fingerprint", base_fingerprint, FINGERPRINT_PATTERN)
        _check_component("variant", variant, VARIANT_PATTERN)
        variant_path = f"{self._root}/{task}/{base_fingerprint}/{variant}"
        return sorted({user for user, version in _complete_versions(self._fs, variant_path, depth=2)})

    # -- deleting --------------------------------------------------------------------------

    def delete_user(self, user: str, task: str | None = None) -> int:
        """Delete every version of every adapter of ``user`` (of one task, or all); return how many.

        Manifests go first, so readers stop seeing the versions before their files disappear.
        """
        user = validate_user_id(user)
        if task is not None:
            _check_component("task", task, TASK_PATTERN)
        deleted_versions = 0
        for variant_path in self._variant_paths(task):
            files = list_files(self._fs, f"{variant_path}/{user}")
            if not files:
                continue
            manifests = [path for path in files if path.endswith(f"/{MANIFEST_NAME}")]
            if manifests:
                self._fs.rm(manifests)
            versions = {part for path in files
                        if VERSION_PATTERN.fullmatch(part := path[len(variant_path) + 1:].split("/")[1])}
            self._fs.rm(f"{variant_path}/{user}", recursive=True)
            deleted_versions += len(versions)
        return deleted_versions

    def gc_incomplete(self, older_than_s: float) -> int:
        """Remove version folders without a manifest that a publisher can no longer be writing.

        A folder goes when its version time is over ``older_than_s`` ago (the grace period) and
        it holds no unexpired publish lease (``LEASE_NAME``; an unreadable lease counts as
        none); just before removing, the folder is listed again and kept if a manifest or a
        fresh lease appeared meanwhile. These are the leftovers of writers that crashed
        mid-publish. Returns how many folders were removed.
        """
        now = datetime.now(UTC)
        self._fs.invalidate_cache(self._root)
        # withdirs: a writer may have died after creating its folder but before any upload.
        paths = self._fs.find(self._root, withdirs=True)
        version_files: dict[str, set[str]] = {}
        for path in paths:
            relative = path[len(self._root) + 1:].split("/")
            if len(relative) < 5 or not VERSION_PATTERN.fullmatch(relative[4]):
                continue
            version_dir = "/".join([self._root, *relative[:5]])
            names = version_files.setdefault(version_dir, set())
            if len(relative) > 5:
                names.add("/".join(relative[5:]))
        removed = 0
        for version_dir, names in sorted(version_files.items()):
            age_s = (now - version_time(version_dir.rsplit("/", 1)[1])).total_seconds()
            if MANIFEST_NAME in names or age_s <= older_than_s:
                continue
            if LEASE_NAME in names and self._lease_live(version_dir):
                continue
            fresh = {path[len(version_dir) + 1:] for path in list_files(self._fs, version_dir)}
            if MANIFEST_NAME in fresh or (LEASE_NAME in fresh and self._lease_live(version_dir)):
                continue
            self._fs.rm(version_dir, recursive=True)
            removed += 1
        return removed

    def _lease_live(self, version_dir: str) -> bool:
        """Whether the publish lease in ``version_dir`` has not expired (unreadable: expired)."""
        try:
            expires = datetime.fromisoformat(json.loads(self._fs.cat_file(f"{version_dir}/{LEASE_NAME}"))["expires"])
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable publish lease %s/%s: %s", version_dir, LEASE_NAME, exc)
            return False
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        return expires > datetime.now(UTC)

    # -- helpers ---------------------------------------------------------------------------

    def _key_path(self, key: AdapterKey) -> str:
        return f"{self._root}/{key.relative_path()}"

    def _variant_paths(self, task: str | None) -> list[str]:
        """Every ``{root}/{task}/{fingerprint}/{variant}`` folder (of one task, or all of them)."""
        paths = [self._root]
        levels = ((TASK_PATTERN if task is None else re.compile(re.escape(task))),
                  FINGERPRINT_PATTERN, VARIANT_PATTERN)
        for pattern in levels:
            children = []
            for path in paths:
                self._fs.invalidate_cache(path)
                try:
                    names = self._fs.ls(path, detail=False)
                except FileNotFoundError:
                    continue
                children += [name.rstrip("/") for name in names
                             if pattern.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])]
            paths = children
        return paths


@dataclass(frozen=True)
class _RolledBack:
    """A key's rollback: ``version`` is current, the versions after it through ``through`` are not."""

    version: str
    through: str

    def passes_over(self, version: str) -> bool:
        return self.version < version <= self.through


def _now_s() -> float:
    return datetime.now(UTC).timestamp()


def _complete_versions(fs: AbstractFileSystem, path: str, depth: int) -> list[tuple[str, str]]:
    """``(user, version)`` of each manifest ``depth`` folders below ``path`` (user "" at depth 1)."""
    found = []
    for file_path in list_files(fs, path):
        parts = file_path[len(path) + 1:].split("/")
        if len(parts) == depth + 1 and parts[-1] == MANIFEST_NAME and VERSION_PATTERN.fullmatch(parts[-2]):
            found.append(("/".join(parts[:-2]), parts[-2]))
    return found


def _refuse_nonfinite(key: AdapterKey, adapter_dir: Path, name: str, data: bytes) -> None:
    """``AdapterError`` if a weights file holds NaN or inf: a diverged adapter is never published."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception:  # safetensors' own error types: the format is serving's to judge (decode_adapter)
        return
    # (the store sits below models in the house plan, so it does not borrow models' helper for this)
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise AdapterError(f"cannot publish adapter {key} of user {key.user!r}: {adapter_dir}/{name} holds NaN or "
                           f"infinite values in {len(bad)} tensor(s), first {bad[0]!r} (training diverged?)")
