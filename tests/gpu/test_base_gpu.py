"""GPU correctness of base adaptation under DeepSpeed (pytest -m gpu on a CUDA machine; skipped without one).

``adapt_base`` (what ``jobs/train_base.py`` runs) on a local Ray with one GPU worker, with the
shipped ``configs/deepspeed/zero2.json`` and ``zero3.json`` (ZeRO-3's persistence threshold set to
0, so that even this tiny model's weights are partitioned, as a 7B model's are). Per stage, one
uninterrupted run and one whose worker dies once right after a mid-run checkpoint; the workers are
watched by ``tests.integration.base_runs.watch_base_workers``. Training runs in bfloat16, as shipped.

- merge: the published base equals the pretrained weights (in bfloat16, as trained) plus
  ``alpha / r * B @ A`` of the LoRA that rank 0 merged (captured at the merge), every weight
  full-size; tolerance rtol 1e-2, atol 2e-3 (the merge adds in bfloat16: a few bfloat16 steps);
- optimiser: the learning rate and weight decay the AdamW steps saw are base.optim's linear warmup
  and decay (not the JSON's constant 1e-4 and 0.01), in the resumed run too (schedule restored);
- resume: the restarted worker went on from the checkpoint's step, and its published base equals the
  uninterrupted run's within the same tolerance (DeepSpeed restores the float32 master weights and
  the Adam moments, so only kernel nondeterminism is left);
- flavours in one run: rag-k1 then plain in one Ray Train run (a DeepSpeed engine per flavour, the
  first destroyed before the second starts from the pristine weights): plain's base equals the
  one of plain's run alone within the same tolerance.

``OPPU_TEST_DEVICE=cpu`` runs the same checks on the CPU: the DDP path (float32) and, where
DeepSpeed is installed, ZeRO-2 and ZeRO-3 too (DeepSpeed's CPU accelerator over gloo, bfloat16):
how the ZeRO-3 publish was found writing a tied output head twice (2026-12-07).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import traceback

import pytest
import torch

from tests.integration import base_runs

prepared = base_runs.prepared  # the module's fixture: prepared data and a tiny model

ON_CPU = os.environ.get("OPPU_TEST_DEVICE", "cuda") == "cpu"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs a CUDA device")]

if not ON_CPU:
    pytest.importorskip("deepspeed")
STAGES = ([None] + ([2, 3] if HAS_DEEPSPEED else [])) if ON_CPU else [2, 3]


LR, WEIGHT_DECAY, RANK, ALPHA = 1e-2, 0.05, 8, 32
# 64 samples, 8 a step: 8 steps an epoch, 16 in all, the first 4 warming up; checkpoints at 5, 10, 15.
SETTINGS = [f"base.use_gpu={str(not ON_CPU).lower()}", "base.num_workers=1", "base.max_samples=64",
            "base.optim.batch_size=8", "base.optim.epochs=2", f"base.optim.lr={LR}",
            f"base.optim.weight_decay={WEIGHT_DECAY}", "base.optim.warmup_ratio=0.25", "base.optim.max_length=128",
            "base.checkpoint_every_steps=5", f"base.peft.r={RANK}", f"base.peft.alpha={ALPHA}", "base.peft.dropout=0.0",
            "base.peft.target_modules=[q_proj,v_proj]"]
TOTAL_STEPS, WARMUP_STEPS, FAIL_AT_STEP = 16, 4, 10
RTOL, ATOL = 1e-2, 2e-3


def train_dtype(stage: int | None):
    """DeepSpeed trains in bfloat16, as shipped; the DDP path on the CPU in float32."""
    return torch.float32 if stage is None else torch.bfloat16


@pytest.fixture(scope="module")
def watch(tmp_path_factory):
    yield from base_runs.watched_ray(tmp_path_factory, num_cpus=4, num_gpus=0 if ON_CPU else 1)


@pytest.fixture(scope="module", params=STAGES, ids=[f"zero{s}" if s else "ddp" for s in STAGES])
def runs(request, prepared, watch, tmp_path_factory) -> dict:
    """The stage's uninterrupted, resumed and two-flavour runs: their run dirs, rank 0's reports,
    AdamW steps and the adapter merged last."""
    data, model = prepared
    stage = request.param
    runs = {"stage": stage}
    for kind, fail_at, flavours in (("clean", [], ["plain"]), ("resumed", [str(FAIL_AT_STEP)], ["plain"]),
                                    ("two", [], ["rag-k1", "plain"])):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}-{kind}")
        settings = SETTINGS
        if stage is not None:
            ds_config = json.loads((base_runs.ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
            if stage == 3:
                ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            (run_dir / "ds.json").write_text(json.dumps(ds_config))
            settings = [*SETTINGS, f"base.deepspeed={run_dir / 'ds.json'}"]
        cfg = base_runs.base_config(run_dir, data, model, *settings)
        try:
            reports = base_runs.run_bases(cfg, watch, flavours, fail_at)
            shutil.copy(watch / "merged-adapter.pt", run_dir / "merged-adapter.pt")
        except Exception:
            # Straight to the terminal, past pytest's capture: on the GPU machine a cut-off session
            # (a device call's time limit) never reaches pytest's report (seen 2026-12-06, ZeRO-3).
            print(f"[test_base_gpu] zero{stage} {kind} run failed:\n{traceback.format_exc()}",
                  file=sys.__stderr__, flush=True)
            raise
        runs[kind] = {"dir": run_dir, "reports": reports,
                      "steps": [s for s in base_runs.read_jsonl(watch / "steps.jsonl") if s["rank"] == 0]}
    return runs


def expected_merge(pretrained: dict, adapter: dict, dtype) -> dict:
    """``pretrained`` in the training dtype plus ``alpha / r * B @ A`` on each LoRA target, in float32.
    Adapter keys are the PEFT LoRA model's (``model.<module>.lora_A.default.weight``)."""
    expected = {name: weight.to(dtype).to(torch.float32, copy=True) for name, weight in pretrained.items()}
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("model.").split(".lora_A.")[0]
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        expected[f"{module}.weight"] += ALPHA / RANK * (lora_b @ lora_a)
    return expected


def test_the_published_base_is_the_pretrained_one_plus_the_trained_lora(prepared, runs):
    _, model = prepared
    pretrained = base_runs.published_weights(model)
    adapter = torch.load(runs["clean"]["dir"] / "merged-adapter.pt")
    assert len([k for k in adapter if ".lora_A." in k]) == 2 * 2  # q_proj, v_proj in 2 layers
    merged = base_runs.published_weights(runs["clean"]["dir"] / "base")
    dtype = train_dtype(runs["stage"])
    expected = expected_merge(pretrained, adapter, dtype)
    assert merged.keys() == expected.keys()
    for name, weight in expected.items():
        assert merged[name].shape == weight.shape and merged[name].numel() > 0, f"{name} is not full-size"
        torch.testing.assert_close(merged[name].float(), weight, rtol=RTOL, atol=ATOL, msg=name)
    lora_moved = max(float((expected[n] - pretrained[n].to(dtype).float()).abs().max()) for n in expected)
    assert lora_moved > 10 * ATOL, "the LoRA is too small for this test to tell a merge from none"


def test_base_optim_schedule_and_weight_decay_reach_the_optimizer(runs):
    """linear warmup over 4 steps to 1e-2, then linear decay to 0 at step 16 (transformers'
    get_linear_schedule_with_warmup); every step with base.optim's weight decay."""
    expected = [LR * (s / WARMUP_STEPS if s < WARMUP_STEPS else (TOTAL_STEPS - s) / (TOTAL_STEPS - WARMUP_STEPS))
                for s in range(TOTAL_STEPS)]
    for kind in ("clean", "resumed"):
        steps = runs[kind]["steps"]
        assert [s["lr"][0] for s in steps] == pytest.approx(expected, abs=1e-9), kind
        assert {wd for s in steps for wd in s["weight_decay"]} == {WEIGHT_DECAY}, kind


def test_a_lost_worker_resumes_from_the_checkpoint_with_the_same_result(runs):
    reports = runs["resumed"]["reports"]
    died = next(i for i, r in enumerate(reports) if r["checkpoint"] and r["step"] == FAIL_AT_STEP)
    after = reports[died + 1:]
    assert after and after[0]["pid"] != reports[died]["pid"]
    assert {r["resumed_from_step"] for r in after} == {FAIL_AT_STEP}
    assert after[-1]["step"] == TOTAL_STEPS and after[-1]["steps"] == TOTAL_STEPS - FAIL_AT_STEP
    assert runs["clean"]["reports"][-1]["resumed_from_step"] == 0
    resumed, clean = (base_runs.published_weights(runs[kind]["dir"] / "base") for kind in ("resumed", "clean"))
    assert resumed.keys() == clean.keys()
    for name, weight in clean.items():
        torch.testing.assert_close(resumed[name].float(), weight.float(), rtol=RTOL, atol=ATOL, msg=name)


def test_a_flavour_after_another_in_one_run_equals_its_run_alone(runs):
    reports = runs["two"]["reports"]
    assert len({r["pid"] for r in reports}) == 1
    assert [r["flavour"] for r in reports if r.get("published")] == ["rag-k1", "plain"]
    after, alone = (base_runs.published_weights(runs[kind]["dir"] / "base") for kind in ("two", "clean"))
    assert after.keys() == alone.keys()
    for name, weight in alone.items():
        torch.testing.assert_close(after[name].float(), weight.float(), rtol=RTOL, atol=ATOL, msg=name)
