"""README.md's Quickstart block and then its serving block, run by bash as written, in order, in one
directory (the serving block serves what the Quickstart wrote to ``oppu-run/``).

What is not the reader's terminal, and how the test stands in for it:

- the size: ``OPPU_QUICKSTART_SIZE=smoke``, the README's documented switch, is in the environment;
- the directory: a scratch directory, not the checkout, so ``oppu-run/`` lands there; ``oppu``,
  ``serve`` and ``pip`` are this checkout and this interpreter (small scripts first on ``PATH``);
- ``pip install``: checked, not run (the test must not reinstall the environment it runs in, whose
  editable install may point at another checkout): each requirement must already be met, ``-e .``
  by this checkout being the ``oppu`` that runs;
- the Ray instance: ``RAY_ADDRESS=local``, so ``serve run`` starts its own local Ray as on a fresh
  machine instead of joining a cluster another process on this machine started with ``ray start``.

The block's own port, 8000, is used as written; where another process holds it the serving test is
skipped, naming the port. The Quickstart's second block is this test suite itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docs_blocks import ROOT, bash_blocks

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
PORT = 8000  # the block's own port (serve run's default)

PIP = '''
import importlib.metadata, pathlib, sys
import oppu
for req in [a for a in sys.argv[2:] if a != "-e"]:
    if req.partition("[")[0] == ".":  # this checkout, with or without extras
        assert pathlib.Path(oppu.__file__).parents[1] == pathlib.Path(sys.argv[1]), oppu.__file__
    else:
        name, _, version = req.partition("==")
        have = importlib.metadata.version(name).split("+")[0]
        assert not version or have == version, f"{name} {have} installed, the README asks for {version}"
'''


def _readme_block(heading: str):
    return next(b for b in bash_blocks(README) if b.heading == heading)


def _bin(directory: Path) -> Path:
    """``oppu``, ``serve`` and ``pip`` as executables (a background ``serve run &`` must be the
    process ``kill %1`` reaches, so no shell functions)."""
    directory.mkdir()
    scripts = {
        "oppu": 'exec "$PY" -m oppu.cli "$@"',
        "serve": 'exec "$PY" -c "import sys; from ray.serve.scripts import cli; sys.exit(cli())" "$@"',
        "pip": f'[ "$1" = install ] && shift && exec "$PY" -c \'{PIP}\' "{ROOT}" "$@"',
    }
    for name, body in scripts.items():
        path = directory / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return directory


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OPPU_LOG_LEVEL")}
    env.update(PYTHONPATH=str(ROOT), PY=sys.executable, PATH=f"{bin_dir}:{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", OPPU_QUICKSTART_SIZE="smoke", **extra)
    return env


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
    """The Quickstart block run in a scratch directory: (directory, bin dir, result, seconds)."""
    directory = tmp_path_factory.mktemp("readme")
    bin_dir = _bin(directory / ".bin")
    block = _readme_block("Quickstart")
    assert "oppu quickstart" in block.text
    started = time.monotonic()
    run = _bash(block.text, directory, _env(bin_dir), timeout_s=900)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"README Quickstart block (smoke size): {seconds:.0f}s")
    return directory, bin_dir, run, seconds


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
    directory, bin_dir, _, _ = quickstart
    deadline = time.monotonic() + 60
    while not _port_free(PORT):
        if time.monotonic() > deadline:
            pytest.skip(f"port {PORT}, which the README's serving block uses, is held by another process")
        time.sleep(2)
    block = _readme_block("Serving personalized models")
    script = "\n".join(["trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT  # serve run and its Ray gone at the end",
                        block.text])
    started = time.monotonic()
    run = _bash(script, directory, _env(bin_dir, RAY_ADDRESS="local"), timeout_s=600)
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

    directory, bin_dir, _, _ = quickstart
    block = _block_with("oppu users add")
    tags = ["sci-fi", "comedy", "sci-fi", "action", "sci-fi", "sci-fi"]
    history = [{"id": f"newbie-h{i}", "description": f"A crew flies the quiet ship past the planet, take {i}.",
                "tag": tag, "date": f"2021-03-{i + 1:02d}"} for i, tag in enumerate(tags)]
    (directory / "newbie.json").write_text(json.dumps(history))
    run = _bash(block.text, directory, _env(bin_dir), timeout_s=600)
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


def _versions(bin_dir: Path, directory: Path, user: str) -> list[dict]:
    listed = _bash(f"oppu adapters list --run oppu-run --user {user} --variant oppu", directory, _env(bin_dir),
                   timeout_s=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    return [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]


def test_adapters_block_lists_rolls_back_exports_and_imports(quickstart):
    """The versions block, after the users block: newbie's versions listed, the first made current,
    exported as a PEFT folder and imported as newbie2."""
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    directory, bin_dir, _, _ = quickstart
    block = _block_with("oppu adapters rollback")
    run = _bash(block.text, directory, _env(bin_dir), timeout_s=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    listed = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"version"')]
    assert listed and {"version", "created", "trainer", "data_range", "current"} <= set(listed[0])
    versions = _versions(bin_dir, directory, "newbie")
    assert [v["current"] for v in versions].count(True) == 1 and versions[0]["current"]  # the first, rolled back to
    exported = directory / "exported" / "newbie"
    assert (exported / "adapter_config.json").is_file() and any(exported.glob("adapter_model.*"))
    run_dir = directory / "oppu-run"
    store = AdapterStore(str(run_dir / "adapters"))
    assert "newbie2" in store.users("LaMP-2M", base_fingerprint(str(run_dir / "base")), "oppu")


def test_incremental_block_trains_a_new_version_from_the_current_one(quickstart):
    """'the items since': the reader's newbie-later.json (the one thing the test writes) added, and
    newbie's adapter updated incrementally: a new current version whose trainer says so."""
    directory, bin_dir, _, _ = quickstart
    before = _versions(bin_dir, directory, "newbie")
    later = [{"id": f"newbie-l{i}", "description": f"A comic duo wrecks a wedding, take {i}.", "tag": "comedy",
              "date": f"2021-04-{i + 1:02d}"} for i in range(4)]
    (directory / "newbie-later.json").write_text(json.dumps(later))
    block = _block_with("newbie-later.json")
    run = _bash(block.text, directory, _env(bin_dir), timeout_s=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    after = _versions(bin_dir, directory, "newbie")
    assert len(after) == len(before) + 1 and after[-1]["current"]
    assert "incremental" in after[-1]["trainer"], after[-1]


def test_base_upgrade_block_migrates_every_user_and_cuts_over(quickstart):
    """'When the base model is upgraded': new bases trained, every user with an adapter on the old
    base migrated onto the new one (status complete), and training pointed at the new bases."""
    import yaml

    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    directory, bin_dir, _, _ = quickstart
    block = _block_with("oppu users migrate")
    run = _bash(block.text, directory, _env(bin_dir), timeout_s=900)
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
