"""Running the docs' shell blocks as a reader would, and the Ray clusters they start.

The harness of tests/integration/test_readme_blocks.py, test_readme_jobs.py and
test_doc_walkthrough.py (tests/docs_blocks.py extracts the blocks):

- the reader's commands (``oppu``, ``python``, ``ray``, ``serve``, ``pip``, ...) as small scripts
  running a checkout with this interpreter (``bin_dir``), in an environment without this
  process's Ray, S3 and log settings (``shell_env``); a copy of this checkout where a block writes
  into the directory it runs in or uploads it (``checkout``);
- README "Running the stages as Ray jobs": the ``ray start --head`` ports and the slow-machine
  ``--set``s its *Ports and paths* and *On a slow machine* paragraphs name as the reader's to
  change (``with_ports``, ``at_smallest``), and the one-node cluster's processes stopped by their
  process group and temp dir, never ``ray stop`` (``stop_cluster``);
- a script run by bash with each command's start time traced (``run_traced``), the output and
  trace kept beside it for a reader of a failure, and what it started stopped, pass or fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs_blocks import ROOT, bash_blocks

README = ROOT / "README.md"
JOBS_SECTION = "Running the stages as Ray jobs"
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port")
STAGE_COMMAND = re.compile(r"python jobs/\w+\.py |^oppu (train-base|train-users|evaluate|pipeline) ")
NOTICE = "has constructor arguments in the object store"  # Ray's, kept off a job's output (issue 20.4)

# `pip install REQ...`, checked instead of run: the test must not reinstall the environment it runs
# in (whose editable install may point at another checkout); each requirement must already be met,
# ``-e .`` by the checkout (argv[1]) being the ``oppu`` that runs
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


def checkout(directory: Path) -> Path:
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


def bin_dir(directory: Path, code: Path = ROOT) -> Path:
    """The reader's commands as executables (a background ``serve run &`` must be the process
    ``kill %1`` reaches, so no shell functions), running ``$PY``; ``pip install`` and ``python -m pip
    install`` check their requirements (``PIP``) against the checkout ``code``."""
    directory.mkdir()
    check = f'exec "$PY" -c \'{PIP}\' "{code}" "$@"'
    scripts = {
        "oppu": 'exec "$PY" -m oppu.cli "$@"',
        "python": 'if [ "${1:-}" = -m ] && [ "${2:-}" = pip ] && [ "${3:-}" = install ]; then\n'
                  f'  shift 3; {check}\nfi\nexec "$PY" "$@"',
        "pip": f'[ "$1" = install ] && shift && {check}',
        "ray": 'exec "$PY" -m ray.scripts.scripts "$@"',
        "serve": 'exec "$PY" -c "import sys; from ray.serve.scripts import cli; sys.exit(cli())" "$@"',
        "moto_server": 'exec "$PY" -m moto.server "$@"',
    }
    scripts["python3"] = scripts["python"]
    for name, body in scripts.items():
        path = directory / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return directory


def shell_env(bin_path: Path, code: Path = ROOT, **extra: str) -> dict[str, str]:
    """This environment less its Ray, S3, temp dir and ``oppu`` log settings, with ``bin_path`` first
    on ``PATH`` and the checkout ``code`` as the ``pip install -e .`` (``PYTHONPATH``; a cluster's
    processes inherit both)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_")) and k not in ("OPPU_LOG_LEVEL", "OPPU_ADMIN_TOKEN", "TMPDIR")}
    env.update(PYTHONPATH=str(code), PY=sys.executable, PATH=f"{bin_path}:{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def jobs_section_blocks() -> list[str]:
    blocks = [b.text for b in bash_blocks(README) if b.heading == JOBS_SECTION]
    assert len(blocks) == 2, f"README's {JOBS_SECTION!r} has {len(blocks)} bash blocks: update the tests"
    return blocks


def jobs_section_prose() -> str:
    text = README.read_text()
    start = text.index(f"## {JOBS_SECTION}\n")
    return " ".join(text[start:text.index("\n## ", start + 1)].split())


def smallest() -> str:
    """The jobs section's *On a slow machine* ``--set``s: those of ``oppu quickstart --size smoke``."""
    from oppu.commands.quickstart import SMOKE_OVERRIDES

    sets = " ".join(f"--set {item}" for item in SMOKE_OVERRIDES)
    prose = jobs_section_prose()
    assert "**On a slow machine**, every stage at its smallest, as `oppu quickstart --size smoke`" in prose
    assert sets in prose, "the section's slow-machine --sets are not quickstart's smoke ones"
    return sets


def at_smallest(text: str) -> tuple[str, int]:
    """``text`` with ``smallest()`` appended to every stage command (``jobs/*.py``, ``oppu
    train-base`` ...), after its last continued line, before its comment; and how many there were."""
    lines, sets, staged, i = text.split("\n"), smallest(), 0, 0
    while i < len(lines):
        if STAGE_COMMAND.search(lines[i]):
            while lines[i].endswith("\\"):
                i += 1
            command, hash_, comment = lines[i].partition("  #")
            lines[i] = f"{command.rstrip()} {sets}" + (f"   {hash_.strip()}{comment}" if hash_ else "")
            staged += 1
        i += 1
    return "\n".join(lines), staged


def with_ports(text: str, ports: dict[str, int]) -> str:
    """``text``'s one ``ray start --head`` given the ports ``ports`` (``PORT_FLAGS``), as the jobs
    section's *Ports and paths* says to where its own are taken."""
    flags = " ".join(f"{flag} P" for flag in PORT_FLAGS)
    assert f"`ray start --head {flags}`, with `export RAY_TMPDIR=DIR` first" in jobs_section_prose(), \
        "the section's *Ports and paths* no longer gives these flags: update the tests"
    assert "ray stop" not in text, "the block runs `ray stop`, which stops every Ray of the machine"
    assert text.count("ray start --head") == 1, text
    return text.replace("ray start --head", "ray start --head " + " ".join(
        f"{flag} {ports[flag]}" for flag in PORT_FLAGS))


def one_node_cluster(ports: dict[str, int]) -> str:
    """The jobs section's lines that make its one-node cluster (token auth, ``ray start --head``),
    on ``ports``: what a block that says "on a cluster" runs after."""
    wanted = [line for line in jobs_section_blocks()[0].split("\n")
              if line.startswith(("export RAY_AUTH_MODE=token", "ray start --head"))]
    assert len(wanted) == 2, f"the jobs section no longer starts its cluster so: {wanted}"
    return with_ports("\n".join(wanted), ports)


def ours(ray_tmpdir: str) -> list[int]:
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


def stop_cluster(group: int, ray_tmpdir: str, grace_s: float = 20) -> list[int]:
    """The cluster a ``ray start`` in the bash of process group ``group`` made (``ray start`` leaves
    its processes in that group; any that left it are found by ``ray_tmpdir`` in their command
    line): SIGTERM, SIGKILL to what is left after ``grace_s``. Returns the pids that outlived it
    all (none expected). Never ``ray stop``: it stops every Ray of this machine."""
    def group_alive() -> bool:
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive():
            os.killpg(group, sig)
        for pid in ours(ray_tmpdir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while (group_alive() or ours(ray_tmpdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
    return ours(ray_tmpdir)


def timings(trace: Path) -> str:
    """The top-level commands of the trace, each with its seconds up to the next one (a command run
    again, as in a wait loop, adds its time to the line above)."""
    steps = [(float(m[1]), m[2]) for m in re.finditer(r"^\+ (\d+\.\d+) (.*)$", trace.read_text(), re.M)]
    steps.append((time.time(), "(end)"))
    shown: list[list] = []
    for (start, command), (end, _) in zip(steps, steps[1:], strict=False):
        if shown and any(command == text for _, text in shown):
            shown[-1][0] += end - start
        else:
            shown.append([end - start, command])
    return "\n".join(f"{seconds:6.1f}s  {command[:100]}" for seconds, command in shown)


def job_outputs(out: str) -> list[str]:
    """The output of each ``ray job submit`` (from its "Job submission server address" line to the
    job's "succeeded" line), in order."""
    return re.findall(r"Job submission server address.*?Job 'raysubmit_\w+' succeeded", out, re.S)


@dataclass
class Ran:
    out: str
    err: str
    seconds: float
    stopped: object  # what ``stop`` returned


def run_traced(script: str, *, name: str, what: str, cwd: Path, env: dict, tmp: Path, timeout_s: float,
               stop: Callable[[subprocess.Popen, str | None], object], logs: str = "") -> Ran:
    """``script`` run by ``bash -euo pipefail`` in a session of its own, each command traced with its
    start time; then ``stop(bash, failure)`` (failure: None, or why it failed), pass or fail, to stop
    what it started. ``tmp`` keeps ``NAME.sh``, its output and the trace; each command's seconds are
    printed. A failure or a timeout fails the test, naming ``what`` ran and ``logs`` (where the
    started processes' logs are)."""
    trace = tmp / f"{name}-trace.txt"  # each command as bash ran it, with its start time (not the output)
    text = "\n".join(["set -euo pipefail", f"exec 9>{trace}", "BASH_XTRACEFD=9", "PS4='+ $EPOCHREALTIME '",
                      "set -x", script])
    (tmp / f"{name}.sh").write_text(text)  # what ran, for a reader of a failure
    started = time.monotonic()
    bash = subprocess.Popen(["bash", "-c", text], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = bash.communicate(timeout=timeout_s)
        failure = f"exit {bash.returncode}" if bash.returncode else None
    except subprocess.TimeoutExpired:
        out, err, failure = None, None, f"timed out after {timeout_s:.0f}s"
    seconds = time.monotonic() - started
    stopped = stop(bash, failure)
    if out is None:
        out, err = bash.communicate()
    for suffix, output in (("stdout", out), ("stderr", err)):
        (tmp / f"{name}-{suffix}.txt").write_text(output)
    print(f"{what}, seconds from each command's start to the next's:\n{timings(trace)}")
    if failure:
        pytest.fail(f"{what} {failure} (stopped: {stopped}); script, output and trace in {tmp}"
                    f"{', ' + logs if logs else ''}:\n{out[-6000:]}\n{err[-6000:]}")
    print(f"{what} as written: {seconds:.0f}s")
    return Ran(out, err, seconds, stopped)
