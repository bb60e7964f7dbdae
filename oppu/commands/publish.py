"""``oppu publish``: upload what a local run dir holds to a run dir on object storage.

    oppu publish --run /tmp/oppu-run --to s3://oppu/runs/quickstart [--dry-run]

Every stage a cluster job reads, as present in the local run dir (docs/cluster.md):

- ``data/`` — the prepared data set with every profiles file (``profiles-<writer>.parquet``);
- ``pretrained/`` — the tiny default model (``model: tiny``), so train_base can run remotely too;
- ``base/`` and every ``base-<flavour>/`` — each task-adapted base with a ``config.json``; the
  same, and ``pretrained/``, of every ``bases/<name>/`` (a base upgrade's new bases, ``RunConfig.bases``);
- ``adapters/`` — the adapter store, merged into the remote one: a complete version (one with
  a ``manifest.json``) that the remote store lacks is uploaded, its manifest last, so a reader
  never sees half an adapter; versions already there and incomplete local ones are left alone.

``data``, ``pretrained`` and the bases replace what was at the target (``fsutil.publish_dir``).
Through the project's one filesystem layer (fsspec): ``--to`` is any URI it knows, or a path.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from oppu import fsutil
from oppu.errors import DataError

HELP = ("Upload a local run dir (data and profiles, pretrained model, every base flavour, a base "
        "upgrade's bases/, adapter store) to a run dir on object storage, e.g. s3://bucket/runs/NAME.")

_BASE_DIR = re.compile(r"base(-[a-z]+)?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the local run directory (jobs' run_dir)")
    parser.add_argument("--to", required=True, help="the target run dir, e.g. s3://oppu/runs/quickstart")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run).expanduser().resolve()
    if fsutil.is_remote(args.run) or not (run_dir / "data" / "dataset.json").is_file():
        raise DataError("not a local run directory: data/dataset.json is missing (run `oppu prepare "
                        "--out RUN/data` or `oppu quickstart --out RUN` first)", file=str(args.run))
    target = args.to.rstrip("/")
    verb = "would publish" if args.dry_run else "published"
    for name in plan(run_dir):
        source, dest = run_dir / name, fsutil.join(target, name)
        if not args.dry_run:
            fsutil.publish_dir(source, dest)
        files = [p for p in source.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        print(f"{verb} {name + '/':<14} -> {dest}  ({len(files)} files, {size / 1e6:.1f} MB)")
    if (run_dir / "adapters").is_dir():
        counts = publish_adapters(run_dir / "adapters", fsutil.join(target, "adapters"), args.dry_run)
        print(f"{verb} {'adapters/':<14} -> {fsutil.join(target, 'adapters')}  ({counts['new']} "
              f"versions, {counts['present']} already there, {counts['incomplete']} incomplete "
              f"left out, {counts['other']} other files)")
    return 0


def plan(run_dir: Path) -> list[str]:
    """The directories of ``run_dir`` to upload whole: data, pretrained, every complete base, and
    the pretrained model and bases of every ``bases/<name>/``."""
    names = ["data", *_models(run_dir)]
    if (run_dir / "bases").is_dir():
        for folder in sorted(p for p in (run_dir / "bases").iterdir() if p.is_dir()):
            names += [f"bases/{folder.name}/{name}" for name in _models(folder)]
    return names


def _models(folder: Path) -> list[str]:
    """``pretrained`` and the bases directly in ``folder`` that hold a ``config.json``."""
    names = ["pretrained"] if (folder / "pretrained" / "config.json").is_file() else []
    return names + sorted(p.name for p in folder.iterdir()
                          if p.is_dir() and _BASE_DIR.fullmatch(p.name) and (p / "config.json").is_file())


def publish_adapters(local_root: Path, target: str, dry_run: bool = False) -> dict[str, int]:
    """Merge the local adapter store into the one at ``target``; returns counts of versions."""
    from oppu.store.manifest import MANIFEST_NAME, VERSION_PATTERN
    from oppu.store.objects import open_root

    fs, root = open_root(target)
    existing = set(fs.find(root)) if fs.exists(root) else set()
    payload: list[tuple[str, str]] = []
    manifests: list[tuple[str, str]] = []
    counts = {"new": 0, "present": 0, "incomplete": 0, "other": 0}
    versions: dict[Path, list[Path]] = {}
    for path in sorted(local_root.rglob("*")):
        relative = path.relative_to(local_root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue  # temporary files of a write in progress
        if VERSION_PATTERN.fullmatch(path.parent.name):
            versions.setdefault(path.parent, []).append(path)
        else:  # e.g. the token store: replaced
            payload.append((str(path), f"{root}/{relative.as_posix()}"))
            counts["other"] += 1
    for version_dir, files in versions.items():
        relative = version_dir.relative_to(local_root).as_posix()
        if not (version_dir / MANIFEST_NAME).is_file():
            counts["incomplete"] += 1
            continue
        if f"{root}/{relative}/{MANIFEST_NAME}" in existing:
            counts["present"] += 1
            continue
        counts["new"] += 1
        for path in files:
            pair = (str(path), f"{root}/{relative}/{path.name}")
            (manifests if path.name == MANIFEST_NAME else payload).append(pair)
    if not dry_run:
        for batch in (payload, manifests):  # every version's files before any of its manifests
            if batch:
                if not fsutil.is_remote(target):
                    for _, dest in batch:
                        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                fs.put([s for s, _ in batch], [d for _, d in batch])
    return counts
