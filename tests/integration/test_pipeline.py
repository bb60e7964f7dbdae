"""The real pipeline at the smallest size that still shows each property, on a local Ray.

One module-scoped run directory: synthetic LaMP-2M data, the tiny model, both base flavours
trained with Ray Train. The tests then train personal adapters through Ray Data (in-process and
through ``ray job submit`` to a locally started head node), and evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
        "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=60",
        "base.optim.epochs=1", "base.max_samples=300", "users.optim.epochs=1",
        "users.actors=2", "users.users_per_batch=1", "eval.actors=1", "ray.num_cpus=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A prepared run directory with both task-adapted bases, built once for the module."""
    import ray

    from oppu import cli
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS, run_stages
    from oppu.run_config import RunConfig

    out = tmp_path_factory.mktemp("run")
    lamp = out / "data" / "lamp"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "14", "--seed", "3", "--n-test", "4",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "4",
                     "--out", str(out / "data")]) == 0
    shutil.copyfile(lamp / "reference.json", out / "data" / "reference.json")
    cfg = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml",
                      ["task=LaMP-2M", f"run_dir={out}", *TINY, "base.parallel_flavours=2"])
    run_stages(cfg, ["base"])  # quickstart.yaml's two flavours, adapted at once (base.parallel_flavours)
    ray.shutdown()
    return out


def _config(run_dir: Path, *overrides: str):
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS
    from oppu.run_config import RunConfig

    return load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml",
                       ["task=LaMP-2M", f"run_dir={run_dir}", *TINY, *overrides])


def _adapter_hashes(store_root: Path, variant: str) -> dict[str, str]:
    """user -> sha256 of adapter_model.safetensors of the newest version, read from manifests."""
    hashes = {}
    for manifest in store_root.glob(f"LaMP-2M/*/{variant}/*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        hashes.setdefault(data["user"], []).append((data["version"], data["files"]["adapter_model.safetensors"]))
    return {user: sorted(v)[-1][1] for user, v in hashes.items()}


def test_base_models_are_merged_and_loadable(run_dir):
    from transformers import AutoModelForCausalLM

    for name in ("base", "base-rag"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / name)
        assert not any("lora" in n for n, _ in model.named_parameters())
        provenance = json.loads((run_dir / name / "oppu-base.json").read_text())
        assert provenance["flavour"] == ("plain" if name == "base" else "rag")
        assert provenance["samples"] > 0


def test_adapters_do_not_depend_on_other_users_and_rerun_skips(run_dir, tmp_path):
    """Trained by the per-user path, a user's adapter is bit-identical whether or not other
    users' data was in the run; a re-run trains nothing twice."""
    import ray

    from oppu.data.dataset import read_dataset
    from oppu.pipeline import run_stages

    test_users = sorted(u.user_id for u in read_dataset(run_dir / "data").test_users())
    alone, together = tmp_path / "alone", tmp_path / "together"
    try:
        run_stages(_config(run_dir, f"store={together}", "users.variants=[oppu]"), ["users"])
        last = test_users[-1]
        run_stages(_config(run_dir, f"store={alone}", "users.variants=[oppu]", f"users.users=[{last}]"),
                   ["users"])
        with_others, by_itself = _adapter_hashes(together, "oppu"), _adapter_hashes(alone, "oppu")
        assert sorted(with_others) == test_users and list(by_itself) == [last]
        assert with_others[last] == by_itself[last]
        assert len(set(with_others.values())) == len(test_users)  # users differ from each other

        from oppu.training.users_report import load_report

        run_stages(_config(run_dir, f"store={together}", "users.variants=[oppu]"), ["users"])
        report = load_report(str(run_dir), "oppu")
        assert report["trained"] == 0 and report["skipped"] == len(test_users)
        versions = list(together.glob("LaMP-2M/*/oppu/*/*/manifest.json"))
        assert len(versions) == len(test_users)  # exactly one version each
    finally:
        ray.shutdown()


def test_variants_trained_at_once_equal_one_after_another(run_dir, tmp_path):
    """``users.parallel_variants``: two variants' actor pools at once write the same adapters
    (per-user path: bit-identical) as the variants one after another."""
    import ray

    from oppu.pipeline import run_stages

    variants = "users.variants=[oppu,rag-k1+oppu]"
    at_once, in_turn = tmp_path / "at-once", tmp_path / "in-turn"
    try:
        run_stages(_config(run_dir, f"store={at_once}", variants, "users.parallel_variants=2",
                           "users.actors=1"), ["users"])
        run_stages(_config(run_dir, f"store={in_turn}", variants), ["users"])
    finally:
        ray.shutdown()
    for variant in ("oppu", "rag-k1+oppu"):
        parallel, sequential = _adapter_hashes(at_once, variant), _adapter_hashes(in_turn, variant)
        assert len(parallel) == 4 and parallel == sequential


def test_bad_user_fails_alone(run_dir, tmp_path):
    """A user whose data cannot be trained on is reported failed; the others are trained."""
    import pandas as pd
    import ray

    from oppu.data.dataset import read_dataset, write_dataset
    from oppu.data.records import HistoryItem
    from oppu.pipeline import run_stages
    from oppu.training.users_report import load_report

    dataset = read_dataset(run_dir / "data")
    users = dataset.users
    broken = next(u for u in users if u.role == "test")
    broken.history = [HistoryItem(id="x1", fields={"description": "no tag field here"})]
    data = tmp_path / "data"
    write_dataset(data, "LaMP-2M", users, {})
    try:
        run_stages(_config(run_dir, f"data={data}", f"store={tmp_path / 'store'}",
                           "users.variants=[oppu]"), ["users"])
    finally:
        ray.shutdown()
    report = load_report(str(run_dir), "oppu")
    by_user = pd.DataFrame(report["users"]).set_index("user_id")["status"].to_dict()
    assert by_user[broken.user_id] == "failed"
    assert "tag" in next(u["error"] for u in report["users"] if u["user_id"] == broken.user_id)
    assert sum(s == "trained" for s in by_user.values()) == len(dataset.test_users()) - 1


def test_ray_job_submit_train_users_then_evaluate(run_dir, tmp_path):
    """`ray job submit` of jobs/train_users.py to a locally started head node writes adapters.

    The head is one ``ray start --block`` of its own, stopped by its own process tree (not ``ray
    stop --force``, which ended every Ray instance on the machine, other tests' clusters too)."""
    import tempfile

    from cluster.local_cluster import LocalCluster, LocalClusterConfig
    from tests.integration.test_cluster_local import _free_port_range

    state_dir = tempfile.mkdtemp(prefix="oppu-lc-", dir="/tmp")  # short: Ray's socket paths
    head = LocalCluster(LocalClusterConfig(
        state_dir=state_dir, gcs_port=_free_port(), dashboard_port=_free_port(),
        port_base=_free_port_range(200), head_num_cpus=2, workers=[], auth="disabled", stop_timeout_s=10))
    head.start()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **head.client_env()}
    ray_bin = [sys.executable, "-m", "ray.scripts.scripts"]
    store = tmp_path / "adapters"
    try:
        submit = subprocess.run(
            [*ray_bin, "job", "submit", "--address", head.dashboard_url,
             "--working-dir", str(ROOT), "--", "python", "jobs/train_users.py",
             "--config", "oppu/configs/quickstart.yaml", "--set", "task=LaMP-2M",
             "--set", f"run_dir={run_dir}", "--set", f"store={store}",
             *[arg for item in TINY for arg in ("--set", item)]],
            env=env, capture_output=True, text=True, timeout=600)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
    finally:
        head.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    from oppu.data.dataset import read_dataset

    test_users = sorted(u.user_id for u in read_dataset(run_dir / "data").test_users())
    for variant in ("oppu", "rag-k1+oppu"):
        assert sorted(_adapter_hashes(store, variant)) == test_users
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = next(store.glob("LaMP-2M/*/oppu/*/*/adapter_config.json")).parent
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base"), adapter)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0

    # evaluate every method against what the submitted job wrote
    import ray

    from oppu.pipeline import run_stages

    try:
        metrics = run_stages(_config(run_dir, f"store={store}", f"run_dir={run_dir}"), ["evaluate"])
    finally:
        ray.shutdown()
    assert set(metrics["methods"]) == {"non-personalized", "random-history", "rag-k1", "rag-k2",
                                       "rag-k4", "oppu", "rag-k1+oppu"}
    assert not metrics["errors"]
    for scores in metrics["methods"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["f1"] <= 1.0
    predictions = json.loads((run_dir / "predictions" / "oppu.json").read_text())
    assert predictions["task"] == "LaMP_2M" and len(predictions["golds"]) == metrics["n_queries"]
    assert "bayes" in metrics["reference"] and (run_dir / "metrics.md").exists()
