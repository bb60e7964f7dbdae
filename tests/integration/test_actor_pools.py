"""The per-user actor pool hands out one batch of users at a time, spread over every actor,
each batch a consecutive run of the sorted order and exactly ``users_per_batch`` users (the
10,000-user stall was one task holding thousands of users because the sorted users sat in a few
large blocks; Ray Data's own sort then cut 100 users into batches of 47, 50 and 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Its own driver process, so this test never shares a Ray connection with other tests.
DRIVER = """
import json, os, time
import pyarrow as pa
import ray, ray.data
from oppu.actor_pools import one_batch_per_actor, one_block_per_batch

ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False

class Recorder:
    def __init__(self):
        self.pid = os.getpid()
        self.calls = 0

    def __call__(self, batch):
        time.sleep(0.5)  # a batch is minutes of training in the real pool
        self.calls += 1
        n = len(batch["rank"])
        return {"rank": batch["rank"], "pid": [self.pid] * n, "call": [f"{self.pid}/{self.calls}"] * n}

# 62 users, sorted longest first in one table (oppu.actor_pools.read_test_users)
users = pa.table({"rank": list(range(62)), "n_history": [1000 - 7 * i for i in range(62)]})
users = one_block_per_batch(users, 4)
out = users.map_batches(Recorder, batch_size=4, compute=one_batch_per_actor(2), num_cpus=1).take_all()
calls = {}
for r in out:
    calls.setdefault(r["call"], {"pid": r["pid"], "ranks": []})["ranks"].append(r["rank"])
print(json.dumps({"calls": list(calls.values()), "ranks": sorted(r["rank"] for r in out)}))
"""


def test_batches_are_consecutive_runs_spread_over_every_actor(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ranks"] == list(range(62))  # nobody lost or doubled
    calls = result["calls"]
    assert sorted(len(call["ranks"]) for call in calls) == [2] + [4] * 15  # a batch is users_per_batch users
    for call in calls:  # similar history lengths together: a run of the sorted order
        ranks = sorted(call["ranks"])
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks)))
    # Both actors take a share; on the old path the one block was one task on one actor.
    users_per_actor = Counter()
    for call in calls:
        users_per_actor[call["pid"]] += len(call["ranks"])
    assert len(users_per_actor) == 2 and min(users_per_actor.values()) >= 8, users_per_actor
