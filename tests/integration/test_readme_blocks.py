"""README.md's Quickstart block and then its serving and user-life blocks, run by bash as written, in
order, in one directory (each serves or trains what the blocks before wrote to ``oppu-run/``).

What is not the reader's terminal, and how the test stands in for it (tests/doc_runs.py):

- the size: ``OPPU_QUICKSTART_SIZE=smoke``, the README's documented switch, is in the environment;
- the directory: a copy of this checkout (``git ls-files``), as a reader's clone, so ``oppu-run/``
  lands there and ``ray job submit --working-dir .`` uploads it; ``oppu``, ``serve``, ``pip``,
  ``python`` and ``ray`` are that copy with this interpreter (small scripts first on ``PATH``);
- ``pip install``: checked, not run (the test must not reinstall the environment it runs in, whose
  editable install may point at another checkout): each requirement must already be met, ``-e .``
  by the copy being the ``oppu`` that runs (``PYTHONPATH``);
- the Ray instance: ``RAY_ADDRESS=local`` for ``serve run``, so it starts its own local Ray as on a
  fresh machine instead of joining a cluster another process on this machine started with ``ray
  start``; for the block that submits a Ray job "on a cluster", the one-node cluster of README's
  "Running the stages as Ray jobs" (its ``RAY_AUTH_MODE=token`` and ``ray start --head``, on free
  ports and a Ray temp dir of its own, as its *Ports and paths* says), stopped after the block by
  its processes alone (never ``ray stop``), and the slow-machine ``--set``s the block's prose asks
  for on a smoke run. On this 2-core machine (load average near 1.5) that block took 26 s (ray
  start 8 s, the job 18 s: both users skipped), about 50 s with the cluster's stop; the module 320 s.

The block's own port, 8000, is used as written; where another process holds it the serving test is
skipped, naming the port. The Quickstart's second block is this test suite itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.doc_runs import (
    PORT_FLAGS,
    README,
    at_smallest,
    bin_dir,
    checkout,
    job_outputs,
    one_node_cluster,
    run_traced,
    shell_env,
    stop_cluster,
)
from tests.docs_blocks import bash_blocks
from tests.integration.test_cluster_local import _free_port

pytestmark = pytest.mark.integration

PORT = 8000  # the block's own port (serve run's default)


def _readme_block(heading: str):
    return next(b for b in bash_blocks(README) if b.heading == heading)


def _env(bin_path: Path, **extra: str) -> dict[str, str]:
    return shell_env(bin_path, bin_path.parent, OPPU_QUICKSTART_SIZE="smoke", **extra)


def _bash(script: str, cwd: Path, env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """``script`` under ``bash -euo pipefail`` in a session of its own, killed whole on a timeout
    (a background ``serve run`` included)."""
    process = subprocess.Popen(["bash", "-c", f"set -euo pipefail\n{script}"], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"timed out after {timeout_s:.0f}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The Quickstart block run in a copy of the checkout: (directory, bin dir, result, seconds)."""
    directory = checkout(tmp_path_factory.mktemp("readme"))
    bin_path = bin_dir(directory / ".bin", directory)
    block = _readme_block("Quickstart")
    assert "oppu quickstart" in block.text
    started = time.monotonic()
    run = _bash(block.text, directory, _env(bin_path), timeout_s=900)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"README Quickstart block (smoke size): {seconds:.0f}s")
    return directory, bin_path, run, seconds


def test_quickstart_block_prints_the_table_and_only_the_projects_progress(quickstart):
    directory, _, run, _ = quickstart
    metrics = json.loads((directory / "oppu-run" / "metrics.json").read_text())
    assert metrics["n_test_users"] == 4 and set(metrics["methods"]) == {"non-personalized", "oppu"}
    assert "| oppu |" in run.stdout and "Finished in" in run.stdout
    assert "[stages] 4/4 steps (100%)" in run.stderr and "[evaluate] 4/4 users (100%)" in run.stderr
    for noise in ("Loading weights", "pid=", "FutureWarning", "Starting execution of Dataset",
                  "Started a local Ray instance", "has constructor arguments in the object store"):
        assert noise not in run.stdout + run.stderr, noise


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serving_block_answers_a_completion_for_a_quickstart_user(quickstart):
    directory, bin_path, _, _ = quickstart
    deadline = time.monotonic() + 60
    while not _port_free(PORT):
        if time.monotonic() > deadline:
            pytest.skip(f"port {PORT}, which the README's serving block uses, is held by another process")
        time.sleep(2)
    block = _readme_block("Serving personalized models")
    script = "\n".join(["trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT  # serve run and its Ray gone at the end",
                        block.text])
    started = time.monotonic()
    run = _bash(script, directory, _env(bin_path, RAY_ADDRESS="local"), timeout_s=600)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    at = run.stdout.index('{"id"')
    answer, _ = json.JSONDecoder().raw_decode(run.stdout[at:])
    assert answer["model"] == "base:user00", answer
    assert len(answer["choices"]) == 1 and 0 < answer["usage"]["completion_tokens"] <= 8, answer
    assert _port_free(PORT), "serve run is still serving after `kill %1`"
    print(f"README serving block: {seconds:.0f}s, answer {answer['choices'][0]['text']!r}")


def _block_with(command: str):
    return next(b for b in bash_blocks(README) if command in b.text)


def test_users_block_onboards_and_trains_a_new_user(quickstart):
    """'A user's model over its life': the reader's ``newbie.json`` (the history file the block names) is
    the one thing the test writes; the block adds the user and trains every variant of the run."""
    import pandas as pd

    from oppu.store import AdapterStore

    directory, bin_path, _, _ = quickstart
    block = _block_with("oppu users add")
    tags = ["sci-fi", "comedy", "sci-fi", "action", "sci-fi", "sci-fi"]
    history = [{"id": f"newbie-h{i}", "description": f"A crew flies the quiet ship past the planet, take {i}.",
                "tag": tag, "date": f"2021-03-{i + 1:02d}"} for i, tag in enumerate(tags)]
    (directory / "newbie.json").write_text(json.dumps(history))
    run = _bash(block.text, directory, _env(bin_path), timeout_s=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    users = pd.read_parquet(directory / "oppu-run" / "data" / "users.parquet")
    newbie = users[users.user_id == "newbie"]
    assert len(newbie) == 1 and newbie.iloc[0].role == "test" and newbie.iloc[0].n_history == len(tags)
    from oppu.models import base_fingerprint

    run_dir = directory / "oppu-run"
    store = AdapterStore(str(run_dir / "adapters"))
    fingerprint = base_fingerprint(str(run_dir / "base"))
    assert "newbie" in store.users("LaMP-2M", fingerprint, "oppu")  # the smoke run's one variant
    assert "newbie" in run.stdout + run.stderr


def test_jobs_block_trains_the_named_users_on_a_cluster(quickstart, tmp_path_factory):
    """'On a cluster, many named users as a Ray job', right after the users block, as written, in
    the checkout holding ``oppu-run``: after the jobs section's cluster lines (``export
    RAY_AUTH_MODE=token``, ``ray start --head`` on free ports with a Ray temp dir of its own, as its
    *Ports and paths* says), with the *On a slow machine* ``--set``s the block's prose asks for on a
    smoke run. Both users' data and config are what their adapters were trained on (the users
    block, the Quickstart), so the job skips exactly them: they alone are in its report, with the
    versions the store serves, and no other test user is touched."""
    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore

    directory, bin_path, _, _ = quickstart
    block = _block_with("users.users=")
    prose = " ".join(README.read_text().split())
    assert "*On a slow machine* `--set`s of *Running the stages as Ray jobs*" in prose, \
        "the block's prose no longer says a smoke run's job takes the slow-machine --sets: update this test"
    job, staged = at_smallest(block.text)
    assert staged == 1, block.text
    run_dir = directory / "oppu-run"
    store = AdapterStore(str(run_dir / "adapters"))
    fingerprint = base_fingerprint(str(run_dir / "base"))
    before = {user: store.versions(AdapterKey("LaMP-2M", fingerprint, "oppu", user))
              for user in store.users("LaMP-2M", fingerprint, "oppu")}
    tmp = tmp_path_factory.mktemp("readme-users-job")
    ray_tmpdir = tempfile.mkdtemp(prefix="oppu-ru-", dir="/tmp")  # short: Ray's socket paths live under it
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    ran = run_traced("\n".join([one_node_cluster(ports), job]), name="users-job",
                     what="README's users job block", cwd=directory,
                     env=_env(bin_path, RAY_TMPDIR=ray_tmpdir), tmp=tmp, timeout_s=600,
                     stop=lambda bash, _: stop_cluster(bash.pid, ray_tmpdir), logs=f"Ray's logs in {ray_tmpdir}")
    assert ran.stopped == [], f"still running, naming {ray_tmpdir}: {ran.stopped}"
    shutil.rmtree(ray_tmpdir, ignore_errors=True)
    (output,) = job_outputs(ran.out)
    assert "[train_users oppu] trained 0, skipped 2, failed 0" in output, output[-3000:]
    report = json.loads((run_dir / "reports" / "train_users-oppu.json").read_text())
    assert {u["user_id"]: u["status"] for u in report["users"]} == {"newbie": "skipped", "user07": "skipped"}
    for entry in report["users"]:
        current = store.latest(AdapterKey("LaMP-2M", fingerprint, "oppu", entry["user_id"]))
        assert current is not None and entry["version"] == current.version, (entry, current)
    after = {user: store.versions(AdapterKey("LaMP-2M", fingerprint, "oppu", user)) for user in before}
    assert after == before and {"newbie", "user07"} < set(before), (before, after)


def _versions(bin_path: Path, directory: Path, user: str) -> list[dict]:
    listed = _bash(f"oppu adapters list --run oppu-run --user {user} --variant oppu", directory, _env(bin_path),
                   timeout_s=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    return [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]


def test_adapters_block_lists_rolls_back_exports_and_imports(quickstart):
    """The versions block, after the users block: newbie's versions listed, the first made current,
    exported as a PEFT folder and imported as newbie2."""
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    directory, bin_path, _, _ = quickstart
    block = _block_with("oppu adapters rollback")
    run = _bash(block.text, directory, _env(bin_path), timeout_s=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    listed = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"version"')]
    assert listed and {"version", "created", "trainer", "data_range", "current"} <= set(listed[0])
    versions = _versions(bin_path, directory, "newbie")
    assert [v["current"] for v in versions].count(True) == 1 and versions[0]["current"]  # the first, rolled back to
    exported = directory / "exported" / "newbie"
    assert (exported / "adapter_config.json").is_file() and any(exported.glob("adapter_model.*"))
    run_dir = directory / "oppu-run"
    store = AdapterStore(str(run_dir / "adapters"))
    assert "newbie2" in store.users("LaMP-2M", base_fingerprint(str(run_dir / "base")), "oppu")


def test_incremental_block_trains_a_new_version_from_the_current_one(quickstart):
    """'the items since': the reader's newbie-later.json (the one thing the test writes) added, and
    newbie's adapter updated incrementally: a new current version whose trainer says so."""
    directory, bin_path, _, _ = quickstart
    before = _versions(bin_path, directory, "newbie")
    later = [{"id": f"newbie-l{i}", "description": f"A comic duo wrecks a wedding, take {i}.", "tag": "comedy",
              "date": f"2021-04-{i + 1:02d}"} for i in range(4)]
    (directory / "newbie-later.json").write_text(json.dumps(later))
    block = _block_with("newbie-later.json")
    run = _bash(block.text, directory, _env(bin_path), timeout_s=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    after = _versions(bin_path, directory, "newbie")
    assert len(after) == len(before) + 1 and after[-1]["current"]
    assert "incremental" in after[-1]["trainer"], after[-1]


def test_base_upgrade_block_migrates_every_user_and_cuts_over(quickstart):
    """'When the base model is upgraded': new bases trained, every user with an adapter on the old
    base migrated onto the new one (status complete), and training pointed at the new bases."""
    import yaml

    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    directory, bin_path, _, _ = quickstart
    block = _block_with("oppu users migrate")
    run = _bash(block.text, directory, _env(bin_path), timeout_s=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = directory / "oppu-run"
    last = {}  # each variant's last status line (the --cut-over's)
    for line in run.stdout.splitlines():
        if line.startswith('{"variant"'):
            status = json.loads(line)
            last[status["variant"]] = status
    # newbie2's adapter was imported by the block before: no history, so it is left behind, named
    assert last and all(not s["pending"] and set(s["unmigratable"]) <= {"newbie2"}
                        and s["migrated"] + len(s["unmigratable"]) == s["users"] for s in last.values()), last
    old, new = base_fingerprint(str(run_dir / "base")), base_fingerprint(str(run_dir / "bases" / "v2" / "base"))
    assert old != new
    store = AdapterStore(str(run_dir / "adapters"))
    before = set(store.users("LaMP-2M", old, "oppu"))
    left_behind = {user for s in last.values() for user in s["unmigratable"]}
    assert before and before - left_behind <= set(store.users("LaMP-2M", new, "oppu"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["bases"].endswith("bases/v2")
