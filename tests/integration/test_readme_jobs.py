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
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.docs_blocks import ROOT, bash_blocks
from tests.integration.test_cluster_local import _free_port
from tests.integration.test_doc_walkthrough import NOTICE, _job_outputs, _timings

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
SECTION = "Running the stages as Ray jobs"
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port")
STAGE_COMMAND = re.compile(r"python jobs/\w+\.py |^oppu (train-base|train-users|evaluate|pipeline) ")
RUN = "runs/2m-synth"  # the section's run dir, under the directory it runs in
N_TEST = 6  # the section's `oppu synth --n-test`
TIMEOUT_S = 1200  # both blocks (the module docstring gives the seconds they took)


def _blocks() -> list[str]:
    blocks = [b.text for b in bash_blocks(README) if b.heading == SECTION]
    assert len(blocks) == 2, f"README's {SECTION!r} has {len(blocks)} bash blocks: update this test"
    return blocks


def _prose() -> str:
    text = README.read_text()
    start = text.index(f"## {SECTION}\n")
    return " ".join(text[start:text.index("\n## ", start + 1)].split())


def smallest() -> str:
    """The section's *On a slow machine* ``--set``s: those of ``oppu quickstart --size smoke``."""
    from oppu.commands.quickstart import SMOKE_OVERRIDES

    sets = " ".join(f"--set {item}" for item in SMOKE_OVERRIDES)
    assert "**On a slow machine**, every stage at its smallest, as `oppu quickstart --size smoke`" in _prose()
    assert sets in _prose(), "the section's slow-machine --sets are not quickstart's smoke ones"
    return sets


def script(ports: dict[str, int]) -> str:
    """The two blocks joined, with the section's own substitutions (module docstring)."""
    prose = _prose()
    flags = " ".join(f"{flag} P" for flag in PORT_FLAGS)
    assert f"`ray start --head {flags}`, with `export RAY_TMPDIR=DIR` first" in prose, \
        "the section's *Ports and paths* no longer gives these flags: update this test"
    text = "\n".join(_blocks())
    assert "ray stop" not in text, "the block runs `ray stop`, which stops every Ray of the machine"
    assert text.count("ray start --head") == 1, text
    text = text.replace("ray start --head", "ray start --head " + " ".join(
        f"{flag} {ports[flag]}" for flag in PORT_FLAGS))
    lines, sets, staged = [], smallest(), 0
    for line in text.split("\n"):
        if STAGE_COMMAND.search(line):
            command, hash_, comment = line.partition("  #")
            line = f"{command.rstrip()} {sets}" + (f"   {hash_.strip()}{comment}" if hash_ else "")
            staged += 1
        lines.append(line)
    assert staged == 6, f"{staged} stage commands (3 jobs, 3 oppu commands expected): update this test"
    return "\n".join(lines)


def _checkout(directory: Path) -> Path:
    """This checkout's files (tracked and new, not ignored), as a clone would have them."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    return directory


def _bin(directory: Path) -> Path:
    directory.mkdir()
    for name, body in {"oppu": 'exec "$PY" -m oppu.cli "$@"', "python": 'exec "$PY" "$@"',
                       "ray": 'exec "$PY" -m ray.scripts.scripts "$@"'}.items():
        path = directory / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return directory


def _env(bin_dir: Path, checkout: Path, ray_tmpdir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_")) and k not in ("OPPU_LOG_LEVEL", "OPPU_ADMIN_TOKEN", "TMPDIR")}
    env.update(PYTHONPATH=str(checkout), PY=sys.executable, PATH=f"{bin_dir}:{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmpdir)
    return env


def _ours(ray_tmpdir: str) -> list[int]:
    """Processes whose command line names this run's Ray temp dir (its cluster's, and no other's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if ray_tmpdir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _stop_cluster(group: int, ray_tmpdir: str, grace_s: float = 20) -> list[int]:
    """SIGTERM to the bash's process group (the cluster ``ray start`` left in it), SIGKILL to what
    is left after ``grace_s``; then the same to any process still naming the temp dir. Returns the
    pids that outlived it all (none expected)."""
    def group_alive() -> bool:
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive():
            os.killpg(group, sig)
        for pid in _ours(ray_tmpdir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while (group_alive() or _ours(ray_tmpdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
    return _ours(ray_tmpdir)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both blocks run by bash: (stdout, stderr, seconds, checkout, Ray temp dir, ports, survivors)."""
    tmp = tmp_path_factory.mktemp("readme-jobs")
    checkout = _checkout(tmp / "oppu")
    ray_tmpdir = tempfile.mkdtemp(prefix="oppu-rj-", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    trace = tmp / "trace.txt"  # each command as bash ran it, with its start time (not the output)
    text = "\n".join(["set -euo pipefail", f"exec 9>{trace}", "BASH_XTRACEFD=9", "PS4='+ $EPOCHREALTIME '",
                      "set -x", script(ports)])
    (tmp / "blocks.sh").write_text(text)  # what ran, for a reader of a failure
    started = time.monotonic()
    bash = subprocess.Popen(["bash", "-c", text], cwd=checkout, env=_env(_bin(tmp / "bin"),
                            checkout, ray_tmpdir), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = bash.communicate(timeout=TIMEOUT_S)
        failure = f"exit {bash.returncode}" if bash.returncode else None
    except subprocess.TimeoutExpired:
        out, err, failure = None, None, f"timed out after {TIMEOUT_S}s"
    seconds = time.monotonic() - started
    survivors = _stop_cluster(bash.pid, ray_tmpdir)
    if out is None:
        out, err = bash.communicate()
    for name, output in (("stdout.txt", out), ("stderr.txt", err)):
        (tmp / name).write_text(output)
    print(f"README {SECTION!r}, seconds from each command's start to the next's:\n{_timings(trace)}")
    if failure:
        pytest.fail(f"the blocks {failure}; script, output and trace in {tmp}, Ray's logs in "
                    f"{ray_tmpdir}:\n{out[-6000:]}\n{err[-6000:]}")
    print(f"README {SECTION!r} as written: {seconds:.0f}s")
    yield out, err, seconds, checkout, ray_tmpdir, ports, survivors
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _after_the_jobs(out: str) -> str:
    """The output of the second block: what follows the last job's "succeeded" line."""
    last = list(re.finditer(r"Job 'raysubmit_\w+' succeeded", out))[-1]
    return out[last.end():]


def test_jobs_block_trains_and_evaluates_every_test_user_on_its_own_cluster(jobs):
    out, err, seconds, checkout, ray_tmpdir, ports, _ = jobs
    run = checkout / RUN
    assert f":{ports['--port']}'" in out + err, "ray start did not report the cluster on the given port"
    train_base, train_users, evaluate = _job_outputs(out)
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
