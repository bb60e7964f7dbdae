"""``oppu publish`` to a local target (the S3 path: tests/integration/test_publish_s3.py)."""

from __future__ import annotations

from oppu.cli import main


def _file(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_publish_to_a_local_dir_copies_models_and_merges_complete_adapter_versions(tmp_path, capsys):
    run, target = tmp_path / "run", tmp_path / "target"
    _file(run / "data" / "dataset.json", b"{}")
    _file(run / "data" / "profiles-statistical.parquet")
    _file(run / "base-rag" / "config.json", b"{}")
    _file(run / "base-old" / "weights.bin")  # no config.json: not a model
    version = run / "adapters" / "LaMP-2M" / "fp" / "oppu" / "u1" / "v20261206T000000000000-0123abcd"
    _file(version / "adapter_model.safetensors", b"w")
    _file(version / "manifest.json", b"{}")
    _file(version.with_name("v20261206T000000000001-0123abcd") / "adapter_model.safetensors")  # cut off
    _file(version / ".manifest.json.tmp-1234")  # a write in progress
    _file(run / "adapters" / "_auth" / "tokens.json", b"{}")
    _file(target / "base-rag" / "stale.bin")
    _file(run / "bases" / "v2" / "base" / "config.json", b"{}")  # a base upgrade's new bases
    _file(run / "bases" / "v2" / "pretrained" / "config.json", b"{}")
    _file(run / "bases" / "v2" / "base-half" / "weights.bin")  # no config.json: left out

    assert main(["publish", "--run", str(run), "--to", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "(1 versions, 0 already there, 1 incomplete left out, 1 other files)" in printed
    published = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert published == [
        "adapters/LaMP-2M/fp/oppu/u1/v20261206T000000000000-0123abcd/adapter_model.safetensors",
        "adapters/LaMP-2M/fp/oppu/u1/v20261206T000000000000-0123abcd/manifest.json",
        "adapters/_auth/tokens.json", "base-rag/config.json", "bases/v2/base/config.json",
        "bases/v2/pretrained/config.json", "data/dataset.json", "data/profiles-statistical.parquet"]
