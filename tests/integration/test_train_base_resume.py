"""Base adaptation on a local Ray (two DDP workers on CPU): several flavours in one Ray Train run,
and a lost worker.

- Rank 0 dies once right after a mid-run checkpoint: Ray Train restarts the worker group, which
  resumes from that checkpoint instead of from step 0, and the published merged base equals the one
  of an uninterrupted run (float32 on CPU, same data order, RNG state restored: rtol 1e-5, atol 1e-6,
  summation order being the only freedom left).
- Two flavours in one run publish the bases each flavour's run alone publishes; rank 0 dying right
  after the first one's publication and again in the second one trains neither twice.
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
    # The restarted worker went on from step 6, in epoch 2, ran only the two batches left, and published.
    assert second_life == [{**second_life[0], "flavour": "plain", "epoch": 2, "step": 8, "steps": 2,
                            "resumed_from_step": 6, "published": True, "checkpoint": False}]

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
    stats = json.loads((base / "oppu-base-train.json").read_text())
    assert stats["step"] == 8 and stats["resumed_from_step"] == 0
    assert all(stats[k] >= 0 for k in ("setup_s", "engine_init_s", "train_s", "merge_s"))
    assert not (base / "oppu-train-state.json").exists()
    assert not any("lora" in name for name, _ in AutoModelForCausalLM.from_pretrained(base).named_parameters())


def test_a_rerun_after_the_base_was_lost_resumes_from_the_last_checkpoint(prepared, watch, uninterrupted,
                                                                         tmp_path):
    """The published base lost, the same run again: Ray Train hands the workers the run's latest
    checkpoint (the run name is a digest of its settings, not of where the base goes), from which
    only the steps after it are trained again."""
    import torch

    data, model = prepared
    run_dir, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("base"))
    cfg = base_runs.base_config(copy, data, model, *SETTINGS, f"base.train_storage={run_dir / 'ray-train'}")
    reports = base_runs.run_base(cfg, watch)
    assert [(r["step"], r["resumed_from_step"], r.get("published")) for r in reports] == [(8, 6, True)]
    assert len([s for s in base_runs.read_jsonl(watch / "steps.jsonl") if s["rank"] == 0]) == 2
    again, first = base_runs.published_weights(copy / "base"), base_runs.published_weights(run_dir / "base")
    assert again.keys() == first.keys()
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_flavours(prepared, watch, tmp_path_factory) -> tuple[Path, list[dict]]:
    """plain and rag-k1 adapted in one run."""
    data, model = prepared
    run_dir = tmp_path_factory.mktemp("two-flavours")
    reports = base_runs.run_bases(base_runs.base_config(run_dir, data, model, *SETTINGS), watch, ["plain", "rag-k1"])
    return run_dir, reports


def assert_same_bases(got: Path, expected: Path) -> None:
    import torch

    got, expected = base_runs.published_weights(got), base_runs.published_weights(expected)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_flavours_in_one_run_publish_what_each_run_alone_does(prepared, watch, uninterrupted, two_flavours,
                                                                   tmp_path):
    data, model = prepared
    run_dir, reports = two_flavours
    assert len({r["pid"] for r in reports}) == 1  # one worker group trained both
    assert [(r["flavour"], r["step"], r["checkpoint"]) for r in reports] == [
        (flavour, step, step < 8) for flavour in ("plain", "rag-k1") for step in (3, 4, 6, 8)]
    assert json.loads((run_dir / "base-rag-k1" / "oppu-base.json").read_text())["rag_k"] == 1
    assert "setup_s" not in json.loads((run_dir / "base-rag-k1" / "oppu-base-train.json").read_text())  # paid once

    alone = base_runs.base_config(tmp_path, data, model, *SETTINGS)
    base_runs.run_bases(alone, watch, ["rag-k1"])
    assert_same_bases(run_dir / "base", uninterrupted[0] / "base")
    assert_same_bases(run_dir / "base-rag-k1", tmp_path / "base-rag-k1")
    plain, rag = (base_runs.published_weights(run_dir / name) for name in ("base", "base-rag-k1"))
    assert any(not plain[n].equal(rag[n]) for n in plain), "the two flavours trained the same base"


def test_a_worker_lost_after_the_first_flavour_and_in_the_second_trains_neither_twice(prepared, watch, two_flavours,
                                                                                      tmp_path):
    """Rank 0 dies right after plain is published (the latest checkpoint being plain's step 6),
    then after rag-k1's checkpoint at step 6: the second worker group skips plain and starts rag-k1
    afresh, the third resumes rag-k1 at step 6."""
    data, model = prepared
    cfg = base_runs.base_config(tmp_path, data, model, *SETTINGS)
    reports = base_runs.run_bases(cfg, watch, ["plain", "rag-k1"], fail_at=["plain 8", "rag-k1 6"])
    lives = [[r for r in reports if r["pid"] == pid] for pid in dict.fromkeys(r["pid"] for r in reports)]
    assert [[(r["flavour"], r["step"], r["resumed_from_step"]) for r in life] for life in lives] == [
        [("plain", 3, 0), ("plain", 4, 0), ("plain", 6, 0), ("plain", 8, 0)],
        [("rag-k1", 3, 0), ("rag-k1", 4, 0), ("rag-k1", 6, 0)],
        [("rag-k1", 8, 6)]]
    assert len([s for s in base_runs.read_jsonl(watch / "steps.jsonl") if s["rank"] == 0]) == 8 + 6 + 2
    run_dir, _ = two_flavours
    assert_same_bases(tmp_path / "base", run_dir / "base")
    assert_same_bases(tmp_path / "base-rag-k1", run_dir / "base-rag-k1")
