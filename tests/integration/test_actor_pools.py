"""The per-user actor pool hands out one batch of users at a time, spread over every actor,
each batch a consecutive run of the sorted order (the 10,000-user stall was one task holding
thousands of users because the sorted users sat in a few large blocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Its own driver process, so this test never shares a Ray connection with other tests.
DRIVER = """
import json, os, time
import ray, ray.data
from oppu.actor_pools import one_batch_per_actor, one_block_per_batch

ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False

class Recorder:
    def __init__(self):
        self.pid = os.getpid()

    def __call__(self, batch):
        time.sleep(0.3)  # a task is minutes of training in the real pool
        n = len(batch["rank"])
        return {"rank": batch["rank"], "pid": [self.pid] * n,
                "batch": [",".join(map(str, batch["rank"]))] * n}

# 60 users in two large blocks, as read_parquet + sort leave a big run
rows = [{"rank": i, "n_history": 1000 - 7 * i} for i in range(60)]
users = ray.data.from_items(rows[::-1], override_num_blocks=2).sort("n_history", descending=True)
users = one_block_per_batch(users, 4)
out = users.map_batches(Recorder, batch_size=4, compute=one_batch_per_actor(2), num_cpus=1).take_all()
print(json.dumps({"batches": sorted({r["batch"] for r in out}),
                  "pids": [r["pid"] for r in out], "ranks": sorted(r["rank"] for r in out)}))
"""


def test_batches_are_consecutive_runs_spread_over_every_actor(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ranks"] == list(range(60))  # nobody lost or doubled
    batches = [[int(r) for r in b.split(",")] for b in result["batches"]]
    assert sorted(len(b) for b in batches) == [4] * 15
    for batch in batches:  # similar history lengths together: a run of the sorted order
        assert batch == list(range(batch[0], batch[0] + 4))
    from collections import Counter

    users_per_actor = Counter(result["pids"])
    assert len(users_per_actor) == 2, users_per_actor
    assert min(users_per_actor.values()) >= 16, users_per_actor  # both actors took several batches
