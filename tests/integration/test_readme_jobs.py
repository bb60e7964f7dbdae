"""README's "Running the stages as Ray jobs": its two command blocks run by bash as written, in order,
in one shell (the ``export`` of the first reaches the second), in a copy of the checkout: synthetic
data, ``ray start --head``, the three ``ray job submit`` of train_base, train_users and evaluate,
then the same stages as ``oppu`` commands against the run dir the jobs wrote.

What is not the reader's terminal, and how the test stands in for it, all of it what the section
names as the reader's to change (*Ports and paths*, *On a slow machine*) and nothing else:

- ``ray start --head``'s ports (6379, 8265, 10001, 52365) by free ones, through the flags the
  section gives, and Ray's temp dir ``/tmp/ray`` by ``RAY_TMPDIR`` (a short scratch dir: Ray's
  socket paths live under it), so the cluster is found by this test's commands and by no other
  process of this machine, and this test joins no other cluster;
- the smallest sizes the section gives for slow machines, appended to every stage command;
- the checkout: a copy of this one's files (``git ls-files``), since the block writes ``runs/``
  into the directory it runs in; ``oppu``, ``python`` and ``ray`` are that copy with this
  interpreter (small scripts first on ``PATH``, ``PYTHONPATH`` for the ``pip install -e .`` that
  the Quickstart asks for; the cluster's processes inherit both).

The cluster ``ray start`` made is stopped afterwards, pass or fail, by its processes alone: ``ray
start`` leaves them in the process group of the bash that ran it, a session of its own, and any
that left it are found by the scratch dir in their command line. Never ``ray stop``: it stops every
Ray of this machine.

On this 2-core machine (2026-12-06) both blocks took 359 s under a load average of 12-25 from other
runs (ray start 15 s, the train_base job 60 s, train_users 92 s, evaluate 68 s; then the ``oppu``
commands: train-base 14 s, reusing the base; train-users 72 s, the actor pool's start-up to skip
every user; evaluate 58 s), 522 s near 20 with ``oppu pipeline`` still in the block. The test prints
each command's seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.doc_runs import (
    JOBS_SECTION,
    NOTICE,
    PORT_FLAGS,
    at_smallest,
    bin_dir,
    checkout,
    job_outputs,
    jobs_section_blocks,
    run_traced,
    shell_env,
    stop_cluster,
    with_ports,
)
from tests.integration.test_cluster_local import _free_port

pytestmark = pytest.mark.integration

SECTION = JOBS_SECTION
RUN = "runs/2m-synth"  # the section's run dir, under the directory it runs in
N_TEST = 6  # the section's `oppu synth --n-test`
TIMEOUT_S = 1200  # both blocks (the module docstring gives the seconds they took)


def script(ports: dict[str, int]) -> str:
    """The two blocks joined, with the section's own substitutions (module docstring)."""
    text, staged = at_smallest(with_ports("\n".join(jobs_section_blocks()), ports))
    assert staged == 6, f"{staged} stage commands (3 jobs, 3 oppu commands expected): update this test"
    return text


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both blocks run by bash: (stdout, stderr, seconds, checkout, Ray temp dir, ports, survivors)."""
    tmp = tmp_path_factory.mktemp("readme-jobs")
    code = checkout(tmp / "oppu")
    ray_tmpdir = tempfile.mkdtemp(prefix="oppu-rj-", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    ran = run_traced(script(ports), name="blocks", what=f"README {SECTION!r}", cwd=code,
                     env=shell_env(bin_dir(tmp / "bin", code), code, RAY_TMPDIR=ray_tmpdir), tmp=tmp,
                     timeout_s=TIMEOUT_S, stop=lambda bash, _: stop_cluster(bash.pid, ray_tmpdir),
                     logs=f"Ray's logs in {ray_tmpdir}")
    yield ran.out, ran.err, ran.seconds, code, ray_tmpdir, ports, ran.stopped
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _after_the_jobs(out: str) -> str:
    """The output of the second block: what follows the last job's "succeeded" line."""
    last = list(re.finditer(r"Job 'raysubmit_\w+' succeeded", out))[-1]
    return out[last.end():]


def test_jobs_block_trains_and_evaluates_every_test_user_on_its_own_cluster(jobs):
    out, err, seconds, checkout, ray_tmpdir, ports, _ = jobs
    run = checkout / RUN
    assert f":{ports['--port']}'" in out + err, "ray start did not report the cluster on the given port"
    train_base, train_users, evaluate = job_outputs(out)
    for job in (train_base, train_users, evaluate):
        connected = re.search(r"\[ray\] connected: (\{.*\})", job)
        assert connected and "'CPU': 2.0" in connected[1], job[-3000:]
        assert NOTICE not in job and "Loading weights" not in job
    assert (run / "base" / "config.json").is_file() and "[train_base]" in train_base, train_base[-3000:]
    assert f"[train_users oppu] trained {N_TEST}, skipped 0, failed 0" in train_users, train_users[-3000:]
    report = json.loads((run / "reports" / "train_users-oppu.json").read_text())
    assert report, "empty train_users report"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test_users"] == N_TEST and set(metrics["methods"]) == {"non-personalized", "oppu"}, metrics
    for method, scores in metrics["methods"].items():
        assert 0.0 <= scores["accuracy"] <= 1.0 and "f1" in scores, (method, scores)
    assert "| oppu |" in evaluate and "| non-personalized |" in evaluate, evaluate[-3000:]
    assert not (checkout / "runs" / "2m").exists()  # the paper-scale run dir is the reader's, not this block's
    print(f"{SECTION}: {seconds:.0f}s; {metrics['methods']}")


def test_oppu_block_joins_that_cluster_and_reuses_what_the_jobs_made(jobs):
    """The second block's commands join the cluster ``ray start`` made (no local Ray of their own: one
    Ray session in the temp dir), reuse the base, skip every user and evaluate again."""
    out, err, _, checkout, ray_tmpdir, _, _ = jobs
    after = _after_the_jobs(out)
    sessions = list((Path(ray_tmpdir) / "ray").glob("session_2*"))
    assert len(sessions) == 1, sessions
    assert err.count("[train_base] reusing ") == 1, err[-3000:]
    assert err.count(f"[train_users oppu] trained 0, skipped {N_TEST}, failed 0") == 1, err[-3000:]
    assert after.count("| oppu |") == 1, after[-3000:]
    assert "Started a local Ray instance" not in out + err


def test_no_process_of_the_cluster_outlives_the_test(jobs):
    *_, ray_tmpdir, _, survivors = jobs
    assert survivors == [], f"still running, naming {ray_tmpdir}: {survivors}"
