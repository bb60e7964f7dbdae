"""The cluster path end to end, at the tiny size: on the local 3-node cluster with every artefact
in a local S3-protocol server (moto), ``ray job submit`` of jobs/train_users.py trains every test
user's adapter into S3.

Not here yet (written in commit 76c0d46, not proven on the build machine: under a load average
of several hundred the serve replicas did not start within 5 minutes): ``serve deploy`` of
cluster/serve-local.yaml answering from those adapters while a replica is killed, and a worker
node killed during jobs/train_users.py with every adapter complete at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cluster.local_cluster import LocalCluster, LocalClusterConfig
from tests.integration.test_cluster_local import _free_port, _free_port_range

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
ADMIN_TOKEN = secrets.token_hex(16)
N_TEST_USERS = 3
# The smallest run that still trains and scores: one base flavour, one adapter variant.
TINY = ["task=LaMP-2M", "tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4",
        "tiny.num_kv_heads=4", "tiny.intermediate_size=128", "tiny.vocab_size=800",
        "tiny.pretrain_steps=40", "base.flavours=[plain]", "base.optim.epochs=1", "base.max_samples=120",
        "users.variants=[oppu]", "users.optim.epochs=1", "users.actors=2", "users.users_per_batch=1",
        "eval.methods=[non-personalized,oppu]", "eval.actors=1"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    s3_env = {name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                  "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    config = LocalClusterConfig(
        state_dir=tempfile.mkdtemp(prefix="oppu-lc-", dir="/tmp"), gcs_port=_free_port(),
        dashboard_port=_free_port(), port_base=_free_port_range(600), object_store_mib=256,
        # serve deploy cannot upload a working dir: the nodes import serve_apps from the repo
        env={**s3_env, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(ROOT),
             "OPPU_ADMIN_TOKEN": ADMIN_TOKEN, "TOKENIZERS_PARALLELISM": "false"})
    with LocalCluster(config) as running:
        yield running
    shutil.rmtree(config.state_dir, ignore_errors=True)


def _client_env(cluster: LocalCluster) -> dict[str, str]:
    return {**os.environ, **cluster.client_env(), "RAY_ADDRESS": cluster.dashboard_url}


def _runtime_env_json(s3_server) -> str:
    """cluster/runtime_env.yaml, pointed at this test's S3 server."""
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["AWS_ENDPOINT_URL"] = s3_server["endpoint_url"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        runtime_env["env_vars"][name] = os.environ[name]
    return json.dumps(runtime_env)


def _submit(cluster, s3_server, script: str, overrides: list[str]) -> subprocess.Popen:
    """``ray job submit`` (blocking, tailing the driver's output) as docs/cluster.md shows it."""
    argv = [*RAY, "job", "submit", "--runtime-env-json", _runtime_env_json(s3_server), "--",
            "python", script, "--config", "oppu/configs/quickstart.yaml",
            *[arg for item in [*TINY, *overrides] for arg in ("--set", item)]]
    return subprocess.Popen(argv, cwd=ROOT, env=_client_env(cluster), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(job: subprocess.Popen, timeout_s: float) -> str:
    output, _ = job.communicate(timeout=timeout_s)
    assert job.returncode == 0 and "succeeded" in output, output[-4000:]
    return output


def _complete_adapters(store_uri: str, variant: str = "oppu") -> dict[str, str]:
    """user -> newest version whose files all match their manifest's sha256 (read from S3)."""
    from oppu import fsutil
    from oppu.store import AdapterKey, AdapterStore

    store = AdapterStore(store_uri)
    fs, task_path = fsutil.filesystem(f"{store_uri}/LaMP-2M")
    fs.invalidate_cache()
    complete = {}
    for fingerprint in fs.ls(task_path, detail=False):
        fingerprint = fingerprint.rstrip("/").rsplit("/", 1)[-1]
        for user in store.users("LaMP-2M", fingerprint, variant):
            manifest, files = store.read_files(AdapterKey("LaMP-2M", fingerprint, variant, user))
            assert set(files) >= {"adapter_config.json", "adapter_model.safetensors"}
            complete[user] = manifest.version
    return complete


@pytest.fixture(scope="module")
def run_uri(cluster, s3_server, tmp_path_factory):
    """A run directory on S3 with data, base model and every test user's adapter, the adapters
    trained by ``ray job submit`` of jobs/train_users.py on the cluster."""
    from oppu import cli, fsutil

    run_uri = f"s3://{s3_server['bucket']}/runs/e2e-{secrets.token_hex(3)}"
    local_run = tmp_path_factory.mktemp("run")
    lamp = local_run / "lamp"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "10", "--seed", "5",
                     "--n-test", str(N_TEST_USERS), "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", str(N_TEST_USERS),
                     "--out", str(local_run / "data")]) == 0
    # The base is adapted into a local run dir (the nodes share this machine's disk) by a driver
    # connected to the cluster, its Ray Train worker on node_a/node_b, then uploaded like any
    # pretrained model. Two problems keep this stage off S3 here: Ray Train's storage check
    # writes an empty object by multipart upload, which moto refuses (INTERNAL_FAILURE), and a
    # *job* driver that trains on S3 data aborts in torch's MKL ("Cannot load libtorch_cpu.so").
    base = subprocess.run(
        [sys.executable, "jobs/train_base.py", "--config", "oppu/configs/quickstart.yaml",
         *[arg for item in [*TINY, f"run_dir={local_run}", f"ray.address={cluster.address}"]
           for arg in ("--set", item)]],
        cwd=ROOT, env=_client_env(cluster), capture_output=True, text=True, timeout=900)
    assert base.returncode == 0, base.stdout[-3000:] + base.stderr[-3000:]
    for name in ("data", "base"):
        fsutil.publish_dir(local_run / name, f"{run_uri}/{name}")
    _finish(_submit(cluster, s3_server, "jobs/train_users.py", [f"run_dir={run_uri}"]), timeout_s=600)
    return run_uri


def test_train_users_job_publishes_every_adapter_to_s3(run_uri):
    from oppu import fsutil
    from oppu.data.dataset import read_dataset
    from oppu.training.users import load_report

    test_users = sorted(u.user_id for u in read_dataset(f"{run_uri}/data").test_users())
    assert len(test_users) == N_TEST_USERS
    assert fsutil.exists(f"{run_uri}/base/config.json")
    assert sorted(_complete_adapters(f"{run_uri}/adapters")) == test_users
    report = load_report(run_uri, "oppu")
    assert report["trained"] == N_TEST_USERS and report["failed"] == 0
