"""Versioned, verifiable personal adapters under one URI root: publish, read, roll back, prune,
delete.

What a version is, its key and manifest: ``oppu.store.manifest``. A folder without a manifest is
not a version, and a reader refuses a version whose files are missing or differ from their hashes.

Races and damage (issue #15): a publish holds a lease on its folder while it uploads, and fails
rather than write a manifest naming a vanished file (``oppu.store.publishing``). Readers skip
broken versions instead of failing on them: ``latest`` is the newest version whose manifest parses
and names its folder and whose files all exist; ``read_files``/``fetch`` without a version fall
back to the newest version whose files match their hashes; ``find`` (the skip-existing check of
training) treats a corrupt, incomplete or tampered version as absent, so the next run retrains and
republishes the user. Each skip is a warning naming the manifest.

Which version is served, and how many are kept (issue #17): a rollback's record passes newer
versions over (``oppu.store.versions``). ``AdapterStore(keep_versions=K)`` keeps the newest K
complete versions of a key: after each successful publish the older ones go (manifest first),
except the current one. ``prune`` does it on demand. Without ``keep_versions`` every version is
kept.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from oppu.errors import AdapterError, AdapterIntegrityError, AdapterNotFound, ConfigError
from oppu.ids import validate_user_id
from oppu.store.manifest import (
    FINGERPRINT_PATTERN,
    MANIFEST_NAME,
    TASK_PATTERN,
    VARIANT_PATTERN,
    VERSION_PATTERN,
    AdapterKey,
    Manifest,
    check_component,
    config_hash,
    new_version_id,
)
from oppu.store.objects import list_files, open_root, sha256_hex, write_atomic
from oppu.store.publishing import (
    DEFAULT_PUBLISH_LEASE_S,
    adapter_files,
    collect_incomplete,
    release_lease,
    upload_leased,
)
from oppu.store.versions import RolledBack, complete_in, complete_versions, key_listing, write_rollback

logger = logging.getLogger(__name__)


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
        local_files = adapter_files(key, adapter_dir)
        version = new_version_id()
        version_path = f"{self._key_path(key)}/{version}"
        file_hashes = upload_leased(self._fs, version_path, key, adapter_dir, local_files, self.publish_lease_s)
        manifest = Manifest(
            user=key.user, task=key.task, variant=key.variant, base_fingerprint=key.base_fingerprint,
            peft_method=peft_method, peft_config=json.loads(peft_config_path.read_text()),
            train_config=config, config_hash=train_config_hash, data_hash=data_hash,
            data_span=data_span, metrics=metrics, files=file_hashes,
            created=datetime.now(UTC).isoformat(), version=version)
        write_atomic(self._fs, f"{version_path}/{MANIFEST_NAME}", manifest.to_json())
        release_lease(self._fs, version_path)
        if self.keep_versions is not None:
            try:
                self.prune(key, self.keep_versions)
            except OSError as exc:  # the version is published; the old ones go after the next publish
                logger.warning("adapter %s: published %s, but deleting versions beyond the newest %d "
                               "failed: %s", key, version, self.keep_versions, exc)
        return manifest

    # -- reading ---------------------------------------------------------------------------

    def versions(self, key: AdapterKey) -> list[str]:
        """Complete versions of ``key`` (those with a manifest), oldest first."""
        key_path = self._key_path(key)
        return sorted(version for user, version in complete_versions(self._fs, key_path, depth=1))

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
        for candidate in complete_in(listing):
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

    def _listing(self, key: AdapterKey) -> tuple[dict[str, set[str]], RolledBack | None]:
        """One fresh listing of ``key``'s folder (``versions.key_listing``)."""
        return key_listing(self._fs, self._key_path(key))

    def _usable_manifests(self, key: AdapterKey, listing: dict[str, set[str]]):
        """Manifests of ``key``'s versions in ``listing`` (``_listing``'s), newest first, skipping
        (with a warning) any version whose manifest is corrupt or names another folder, whose
        listed files are not all there, or whose hashes failed in this process."""
        key_path = self._key_path(key)
        for version in complete_in(listing):
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
        write_rollback(self._fs, self._key_path(key), version, newest)
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
        check_component("task", task, TASK_PATTERN)
        check_component("base fingerprint", base_fingerprint, FINGERPRINT_PATTERN)
        check_component("variant", variant, VARIANT_PATTERN)
        variant_path = f"{self._root}/{task}/{base_fingerprint}/{variant}"
        return sorted({user for user, version in complete_versions(self._fs, variant_path, depth=2)})

    # -- deleting --------------------------------------------------------------------------

    def delete_user(self, user: str, task: str | None = None) -> int:
        """Delete every version of every adapter of ``user`` (of one task, or all); return how many.

        Manifests go first, so readers stop seeing the versions before their files disappear.
        """
        user = validate_user_id(user)
        if task is not None:
            check_component("task", task, TASK_PATTERN)
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
        return collect_incomplete(self._fs, self._root, older_than_s)

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
