"""``oppu publish --run LOCAL --to s3://...`` against a real S3-protocol server (moto): it uploads
the data with its profiles, the pretrained model, every base flavour and the adapter store, and
then nothing a job of the quickstart config reads is missing there (oppu.preflight)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _fake_model(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(b"\0" * 1000)


@pytest.fixture
def local_run(tmp_path) -> tuple[Path, object, str]:
    """A local run dir: data with profiles, pretrained, base, base-rag, one complete adapter
    version and one cut off before its manifest. Returns (run dir, the adapter's key, version)."""
    from oppu import cli
    from oppu.profiles import write_profiles
    from oppu.store import AdapterKey, AdapterStore

    run = tmp_path / "run"
    lamp = tmp_path / "lamp"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "6", "--seed", "1", "--n-test", "2",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "2", "--out", str(run / "data")]) == 0
    write_profiles(str(run / "data"), "statistical", {"u1": "likes twists"})
    for name in ("pretrained", "base", "base-rag"):
        _fake_model(run / name)
    (run / "base-broken").mkdir()  # no config.json: not a model, not uploaded
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\1" * 100)
    store = AdapterStore(str(run / "adapters"))
    key = AdapterKey("LaMP-2M", "fp0", "oppu", "u1")
    manifest = store.publish(key, adapter, data_hash="d", config={"variant": "oppu"}, peft_method="lora",
                             data_span={}, metrics={})
    cut_off = run / "adapters" / "LaMP-2M" / "fp0" / "oppu" / "u2" / "v20261206T000000000000-0123abcd"
    cut_off.mkdir(parents=True)
    (cut_off / "adapter_model.safetensors").write_bytes(b"\2")
    return run, key, manifest.version


def test_publish_uploads_every_input_a_cluster_job_reads(local_run, s3_uri, capsys):
    from oppu import cli, fsutil
    from oppu.config import load_config
    from oppu.preflight import missing_inputs
    from oppu.run_config import RunConfig
    from oppu.store import AdapterStore

    run, key, version = local_run
    cfg = load_config(RunConfig, ROOT / "oppu" / "configs" / "quickstart.yaml", [f"run_dir={s3_uri}"])
    assert len(missing_inputs(cfg, ["users", "evaluate"])) == 3  # data, base, base-rag

    assert cli.main(["publish", "--run", str(run), "--to", s3_uri, "--dry-run"]) == 0
    assert "would publish base-rag/" in capsys.readouterr().out
    assert not fsutil.exists(f"{s3_uri}/data/dataset.json")

    assert cli.main(["publish", "--run", str(run), "--to", s3_uri]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()] == [
        "data/", "pretrained/", "base/", "base-rag/", "adapters/"]
    assert "(1 versions, 0 already there, 1 incomplete left out, 0 other files)" in out
    for name in ("data/users.parquet", "data/profiles-statistical.parquet", "pretrained/config.json",
                 "base/model.safetensors", "base-rag/config.json"):
        assert fsutil.exists(f"{s3_uri}/{name}"), name
    assert not fsutil.exists(f"{s3_uri}/base-broken")
    assert missing_inputs(cfg, ["users", "evaluate"]) == []
    remote = AdapterStore(f"{s3_uri}/adapters")
    assert remote.versions(key) == [version]
    _, files = remote.read_files(key, version)  # verified against the manifest's sha256
    assert files["adapter_model.safetensors"] == b"\1" * 100
    assert not fsutil.exists(f"{s3_uri}/adapters/LaMP-2M/fp0/oppu/u2")

    assert cli.main(["publish", "--run", str(run), "--to", s3_uri]) == 0  # again: nothing new
    assert "(0 versions, 1 already there" in capsys.readouterr().out


def test_publish_refuses_a_directory_that_is_not_a_run(tmp_path, s3_uri, capsys):
    from oppu import cli

    assert cli.main(["publish", "--run", str(tmp_path), "--to", s3_uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a local run directory" in err
