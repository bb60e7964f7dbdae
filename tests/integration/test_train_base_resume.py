"""Base adaptation survives a lost worker: ``adapt_base`` on a local Ray (two DDP workers on CPU),
with rank 0 dying once right after a mid-run checkpoint. Ray Train restarts the worker group,
which resumes from that checkpoint instead of from step 0, and the published merged base equals
the one of an uninterrupted run (float32 on CPU, same data order, RNG state restored: rtol 1e-5,
atol 1e-6, summation order being the only freedom left).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration import base_runs

prepared = base_runs.prepared  # the module's fixture: prepared data and a tiny model

pytestmark = pytest.mark.integration

# 64 samples, 2 workers x 8 a step: 4 steps an epoch, 8 in all; resumable checkpoints at steps 3 and 6.
SETTINGS = ["base.max_samples=64", "base.optim.batch_size=8", "base.optim.epochs=2", "base.optim.lr=3e-3",
            "base.optim.max_length=128", "base.checkpoint_every_steps=3", "base.num_workers=2",
            "base.peft.dropout=0.1"]
FAIL_AT_STEP = 6  # mid-epoch 2: two of its four batches done


@pytest.fixture(scope="module")
def watch(tmp_path_factory):
    yield from base_runs.watched_ray(tmp_path_factory, num_cpus=2)


@pytest.fixture(scope="module")
def uninterrupted(prepared, watch, tmp_path_factory) -> tuple[Path, list[dict]]:
    data, model = prepared
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    reports = base_runs.run_base(base_runs.base_config(run_dir, data, model, *SETTINGS), watch)
    return run_dir, reports


def test_a_lost_worker_resumes_from_the_last_checkpoint(prepared, watch, uninterrupted, tmp_path):
    import torch

    data, model = prepared
    cfg = base_runs.base_config(tmp_path, data, model, *SETTINGS)
    reports = base_runs.run_base(cfg, watch, fail_at_step=FAIL_AT_STEP)

    died = next(i for i, r in enumerate(reports) if r["checkpoint"] and r["step"] == FAIL_AT_STEP)
    first_life, second_life = reports[:died + 1], reports[died + 1:]
    assert len({r["pid"] for r in first_life}) == 1 and second_life[0]["pid"] != first_life[0]["pid"]
    assert [r["step"] for r in first_life] == [3, 4, 6]  # checkpoint, end of epoch 1, checkpoint
    assert all(r["checkpoint"] for r in first_life)  # the end of an epoch is a checkpoint too
    # The restarted worker went on from step 6, in epoch 2, and ran only the two batches left.
    assert second_life == [{**second_life[0], "epoch": 2, "step": 8, "steps": 2, "resumed_from_step": 6}]
    assert second_life[0]["checkpoint"]

    _, clean = uninterrupted
    assert [r["step"] for r in clean] == [3, 4, 6, 8] and clean[-1]["resumed_from_step"] == 0
    weights = base_runs.published_weights
    resumed, expected, pretrained = weights(tmp_path / "base"), weights(uninterrupted[0] / "base"), weights(model)
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(expected[n], pretrained[n]) for n in expected), "training changed nothing"


def test_a_worker_lost_after_an_epoch_resumes_from_its_end(prepared, watch, uninterrupted, tmp_path):
    """The checkpoint at the end of epoch 1 (step 4, no step checkpoint there) is a resumable one."""
    import torch

    data, model = prepared
    cfg = base_runs.base_config(tmp_path, data, model, *SETTINGS)
    reports = base_runs.run_base(cfg, watch, fail_at_step=4)
    died = next(i for i, r in enumerate(reports) if r["checkpoint"] and r["step"] == 4)
    second_life = reports[died + 1:]
    assert second_life[0]["pid"] != reports[died]["pid"]
    assert [(r["step"], r["resumed_from_step"]) for r in second_life] == [(6, 4), (8, 4)]
    resumed, expected = base_runs.published_weights(tmp_path / "base"), base_runs.published_weights(
        uninterrupted[0] / "base")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_published_base_is_the_merged_model(uninterrupted):
    from transformers import AutoModelForCausalLM

    run_dir, _ = uninterrupted
    base = run_dir / "base"
    assert json.loads((base / "oppu-base.json").read_text())["flavour"] == "plain"
    assert not (base / "oppu-train-state.json").exists()
    assert not any("lora" in name for name, _ in AutoModelForCausalLM.from_pretrained(base).named_parameters())


def test_a_rerun_of_a_finished_run_reports_its_merged_model_again(prepared, watch, uninterrupted, tmp_path):
    """The published base lost, the same run again: Ray Train hands the workers the run's final
    checkpoint (the run name is a digest of its settings), which is published without training."""
    data, model = prepared
    run_dir, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("base"))
    cfg = base_runs.base_config(copy, data, model, *SETTINGS, f"base.train_storage={run_dir / 'ray-train'}")
    reports = base_runs.run_base(cfg, watch)
    assert [r.get("reported_again") for r in reports] == [True]
    assert not base_runs.read_jsonl(watch / "steps.jsonl")  # no optimiser step
    again, first = base_runs.published_weights(copy / "base"), base_runs.published_weights(run_dir / "base")
    assert again.keys() == first.keys() and all(again[name].equal(first[name]) for name in first)
