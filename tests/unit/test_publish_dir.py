"""``fsutil.publish_dir`` replaces a published directory (a base, a pretrained model) only once the
new one is complete where it is going, and readers never see half of one (issue #15): locally by
rename, on S3 by staging then a swap with ``config.json`` removed first and written last; the
model loader re-checks ``config.json`` after a download."""

from __future__ import annotations

import logging

import pytest

from oppu import fsutil


def _model(path, tag: str, extra: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(f'{{"tag": "{tag}"}}')
    (path / "model.safetensors").write_bytes(tag.encode() * 10)
    if extra:
        (path / "extra.txt").write_text("old only")
    return path


def test_local_publish_replaces_the_directory_whole(tmp_path):
    target = tmp_path / "run" / "base"
    fsutil.publish_dir(_model(tmp_path / "v1", "old", extra=True), str(target))
    fsutil.publish_dir(_model(tmp_path / "v2", "new"), str(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "model.safetensors").read_bytes() == b"new" * 10
    assert sorted(p.name for p in target.parent.iterdir()) == ["base"]


pytestmark_s3 = pytest.mark.integration


@pytest.fixture
def s3(s3_uri):
    fs, _ = fsutil.filesystem(s3_uri)
    return fs, s3_uri, s3_uri.removeprefix("s3://")


@pytestmark_s3
def test_s3_publish_that_fails_to_upload_leaves_the_old_base(s3, tmp_path, monkeypatch):
    fs, uri, path = s3
    target = f"{uri}/base"
    fsutil.publish_dir(_model(tmp_path / "v1", "old", extra=True), target)

    def broken_put(*args, **kwargs):
        raise OSError("connection reset")

    assert fsutil.filesystem(target)[0] is fs  # fsspec caches instances: patch the one publish_dir gets
    monkeypatch.setattr(fs, "put", broken_put)
    with pytest.raises(OSError, match="connection reset"):
        fsutil.publish_dir(_model(tmp_path / "v2", "new"), target)
    fs.invalidate_cache(path)
    assert fs.cat_file(f"{path}/base/model.safetensors") == b"old" * 10
    assert sorted(f.rsplit("/", 1)[1] for f in fs.find(path)) == ["config.json", "extra.txt", "model.safetensors"]


@pytestmark_s3
def test_s3_swap_never_shows_a_half_base(s3, tmp_path, monkeypatch):
    fs, uri, path = s3
    target = f"{uri}/base"
    fsutil.publish_dir(_model(tmp_path / "v1", "old", extra=True), target)
    real_copy = fs.copy
    seen = []
    self = fs

    def copy(source, dest, *args, **kwargs):
        # What a reader would see at each step of the swap: no model, or the old one whole.
        self.invalidate_cache(f"{path}/base")
        if self.exists(f"{path}/base/config.json"):
            state = (self.cat_file(f"{path}/base/config.json"), self.cat_file(f"{path}/base/model.safetensors"))
            assert state == (b'{"tag": "old"}', b"old" * 10), state
            seen.append("old")
        else:
            seen.append("none")
        return real_copy(source, dest, *args, **kwargs)

    monkeypatch.setattr(fs, "copy", copy)
    fsutil.publish_dir(_model(tmp_path / "v2", "new"), target)
    monkeypatch.undo()
    assert seen and set(seen) == {"none"}  # config.json went first, before any copy
    fs.invalidate_cache(path)
    assert sorted(f.rsplit("/", 1)[1] for f in fs.find(path)) == ["config.json", "model.safetensors"]
    assert fs.cat_file(f"{path}/base/config.json") == b'{"tag": "new"}'
    assert fs.cat_file(f"{path}/base/model.safetensors") == b"new" * 10


@pytestmark_s3
def test_the_loader_downloads_again_when_the_model_was_replaced_meanwhile(s3, tmp_path, monkeypatch, caplog):
    from oppu.models import loading

    fs, uri, path = s3
    target = f"{uri}/base"
    fsutil.publish_dir(_model(tmp_path / "v1", "old"), target)
    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))
    real = loading._download_files
    calls = []

    def download_then_replace(*args):
        out = real(*args)
        if not calls:  # the first download ends just as a new base is published
            fsutil.publish_dir(_model(tmp_path / "v2", "newer"), target)
        calls.append(out)
        return out

    monkeypatch.setattr(loading, "_download_files", download_then_replace)
    caplog.set_level(logging.WARNING, logger="oppu")
    local = loading._download_cached(target)
    assert len(calls) == 2 and any("replaced while it was being downloaded" in r.getMessage() for r in caplog.records)
    assert (local / "model.safetensors").read_bytes() == b"newer" * 10
