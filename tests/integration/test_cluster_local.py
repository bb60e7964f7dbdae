"""The local multi-node cluster: three nodes join, tasks pin to each worker, a killed worker is
seen dead while the rest keep working, and stopping leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from cluster.local_cluster import LocalCluster, LocalClusterConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Runs as its own driver process, so this test never shares a Ray connection with other tests.
PROBE = """
import json, sys, time
import ray

ray.init(address=sys.argv[1], logging_level="ERROR")
expect_alive = int(sys.argv[2])

@ray.remote(num_cpus=1)
def node_of_task():
    return ray.get_runtime_context().get_node_id()

deadline = time.monotonic() + 90  # the GCS marks a lost node dead after its health checks fail
while sum(n["Alive"] for n in ray.nodes()) != expect_alive and time.monotonic() < deadline:
    time.sleep(1)
nodes = ray.nodes()
alive = {resource: n["NodeID"] for n in nodes if n["Alive"] for resource in n["Resources"]
         if resource in ("node_a", "node_b")}
placed = {resource: ray.get(node_of_task.options(resources={resource: 0.01}).remote(), timeout=120)
          for resource in sorted(alive)}
print(json.dumps({"alive": sum(n["Alive"] for n in nodes), "by_resource": alive, "placed": placed,
                  "cpus": ray.cluster_resources().get("CPU", 0)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_range(span: int, first: int = 20000, last: int = 32000) -> int:
    """The first port of ``span`` consecutive free ports (below Linux's ephemeral range)."""
    for base in range(first, last - span, span):
        try:
            for port in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {span} consecutive free ports in {first}..{last}")


def _probe(cluster: LocalCluster, expect_alive: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, cluster.address, str(expect_alive)], cwd=ROOT,
                          env={**os.environ, **cluster.client_env()},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_three_nodes_pinning_worker_loss_and_clean_teardown():
    config = LocalClusterConfig(
        state_dir=tempfile.mkdtemp(prefix="oppu-lc-", dir="/tmp"), gcs_port=_free_port(),
        dashboard_port=_free_port(), port_base=_free_port_range(600), object_store_mib=96)
    cluster = LocalCluster(config)
    processes: list[psutil.Process] = []
    try:
        address = cluster.start()
        assert (Path(config.state_dir) / "address").read_text().strip() == address

        running = _probe(cluster, expect_alive=3)
        assert running["alive"] == 3 and running["cpus"] == 2  # head has 0 CPUs, workers 1 each
        assert set(running["by_resource"]) == {"node_a", "node_b"}
        assert running["by_resource"]["node_a"] != running["by_resource"]["node_b"]
        assert running["placed"] == running["by_resource"]

        # core workers the tasks left behind belong to the nodes' process trees too
        processes += cluster.processes()
        assert len(processes) > 3 * 3

        cluster.kill_node("node_b")
        after_loss = _probe(cluster, expect_alive=2)
        assert after_loss["alive"] == 2
        assert after_loss["placed"] == {"node_a": running["by_resource"]["node_a"]}
        processes += cluster.processes()
    finally:
        cluster.stop()
    survivors = [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    assert not (Path(config.state_dir) / "cluster.json").exists()
    shutil.rmtree(config.state_dir)
