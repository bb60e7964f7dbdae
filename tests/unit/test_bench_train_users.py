"""bench/train_users.py's bookkeeping: same work for every configuration, medians with their spread,
speedups that name both configurations, versions from package metadata (issue 18's hygiene).

The loops themselves run in the CPU smoke run (``python bench/train_users.py --tiny``) and on the GPU.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_users", ROOT / "bench" / "train_users.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_configurations_run_in_phases_whatever_the_order_given(bench):
    given = ["qlora", "batched_fp8", "batched_liger", "sequential_liger", "reference_loop", "varlen_check",
             "batched@16384x25", "packed_peft_liger", "sequential", "profile"]
    ordered = sorted(given, key=bench.config_phase)
    assert ordered == ["varlen_check", "reference_loop", "batched@16384x25", "sequential",
                       "batched_fp8", "batched_liger", "sequential_liger", "packed_peft_liger", "profile", "qlora"]


def test_pooled_steps_train_every_sample_once_an_epoch_in_packed_rows(bench):
    users = bench.synthetic_users(5, 600, bench.TINY, seed=3)
    samples = [s for _, user_samples in users for s in user_samples]
    steps = bench.pooled_steps(users, epochs=2, row_tokens=128, rows_per_step=4, seed=1)
    rows = [row for step in steps for row in step]
    assert sorted(row.sample for row in rows) == sorted(list(range(len(samples))) * 2)
    assert all(sum(len(row) for row in step) <= 4 * 128 for step in steps)
    work = sum(bench.sample_work(user_samples, 2)[0] for _, user_samples in users)
    assert sum(len(row) for row in rows) == work  # the same tokens as every per-user configuration


def _run(bench, name, rate, tokens=1000, losses=(2.0,)):
    m = bench.Measured(name, users=2, input_tokens=tokens, target_tokens=100, attention_token_pairs=10_000,
                       tokens_trained=tokens, seconds=tokens / rate, peak_memory_gib=1.0)
    m.final_losses = {f"u{i}": loss for i, loss in enumerate(losses)}
    return m


def test_a_figure_is_the_median_run_with_its_spread_and_mfu_against_both_peaks(bench):
    runs = [_run(bench, "batched", rate) for rate in (100.0, 130.0, 90.0)]
    figure = bench.summarise(runs, bench.TINY, {"gemm_flops": 1e12})
    assert figure["tokens_per_s"] == 100.0 and figure["repeats"] == 3
    assert figure["spread"] == {"min": 90.0, "max": 130.0, "relative": 0.4}
    flops = bench.training_flops(runs[0], bench.TINY)
    assert figure["mfu_spec_peak"] == round(flops / 10.0 / 989e12, 4)
    assert figure["mfu_measured_peak"] == round(flops / 10.0 / 1e12, 4)
    assert figure["final_loss"] == 2.0


def test_a_run_that_trained_other_tokens_withdraws_the_figure(bench):
    calls = []

    def once(warm_up):
        calls.append(warm_up)
        return _run(bench, "sequential", 100.0, tokens=900)

    runs, notes = bench.run_repeats("sequential", once, 3, lambda: False, expected_tokens=1000)
    assert calls == [True] and len(runs) == 1
    assert "not the same work" in notes["error"]
    runs, notes = bench.run_repeats("sequential", lambda warm: _run(bench, "sequential", 100.0), 3,
                                    lambda: False, expected_tokens=1000)
    assert len(runs) == 3 and notes == {}


def test_results_name_both_configurations_of_every_speedup_and_judge_the_goals(bench, tmp_path):
    results = {"configs": {}, "expected_tokens": 1000}
    for name, rate in (("reference_loop", 2_500.0), ("sequential_liger", 10_000.0), ("packed_peft_liger", 17_000.0),
                       ("batched_liger", 18_600.0), ("batched_fp8", 27_000.0)):
        results["configs"][name] = bench.summarise([_run(bench, name, rate)] * 3, bench.TINY, {"gemm_flops": 8e14})
    results["configs"]["qlora"] = {"error": "skipped: the 4-bit base (bitsandbytes NF4) needs a CUDA GPU"}
    bench.write_results(results, tmp_path, None)

    assert set(results["tokens_per_s"]) >= set(bench.ISSUE_CONFIGS)
    assert results["tokens_per_s"]["qlora"] is None and results["not_measured"]["qlora"].startswith("skipped")
    assert results["same_tokens"] is True
    ratios = {(s["config"], s["over"]): s["ratio"] for s in results["speedups"]}
    assert ratios[("batched_fp8", "sequential_liger")] == 2.7
    assert ratios[("batched_fp8", "batched_liger")] == round(27_000 / 18_600, 3)
    goals = {goal["goal"]: goal["met"] for goal in results["goals"]}
    assert goals[">= 26000"] is True and goals[">= 2.5"] is True and goals[">= 1.5"] is True
    assert (tmp_path / "train_users.json").exists()


def test_versions_come_from_package_metadata(bench):
    import torch

    assert bench.package_version("torch") == torch.__version__.split("+")[0] or \
        bench.package_version("torch") == torch.__version__
    assert bench.package_version("no-such-distribution-oppu") is None
