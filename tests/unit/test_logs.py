"""oppu.logs: one level from -q/-v or OPPU_LOG_LEVEL, records on stderr, progress with total, ETA
and failures by name, the level handed to Ray workers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from oppu import logs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    """Each test starts with the oppu logger as the library leaves it (nothing configured)."""
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    saved = (list(logs.logger.handlers), logs.logger.level, logs.logger.propagate)
    logs.logger.handlers[:] = []
    logs.logger.setLevel(logging.NOTSET)
    yield
    logs.logger.handlers[:], level, logs.logger.propagate = saved
    logs.logger.setLevel(level)


SCORE = ["--task", "LaMP-2M", "--golds", "g.json", "--preds", "p.json"]


@pytest.mark.parametrize("argv, level", [
    (["score"], "INFO"),
    (["-q", "score"], "WARNING"),
    (["score", "-q"], "WARNING"),
    (["-v", "score"], "DEBUG"),
    (["score", "--verbose"], "DEBUG"),
])
def test_one_quiet_and_one_verbose_switch_before_or_after_the_command(argv, level):
    from oppu.cli import build_parser

    args = build_parser(argv).parse_args([*argv, *SCORE])
    assert logs.level_from(getattr(args, "quiet", False), getattr(args, "verbose", False)) == level


def test_quiet_and_verbose_together_are_refused(capsys):
    from oppu.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(["score"]).parse_args(["-q", "-v", "score", *SCORE])
    assert "not allowed with" in capsys.readouterr().err


def test_the_environment_sets_the_level_where_no_switch_does(monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "warning")
    assert logs.level_from() == "WARNING"
    assert logs.level_from(verbose=True) == "DEBUG"
    monkeypatch.setenv(logs.LEVEL_ENV, "loud")
    assert logs.level_from() == "INFO"


def test_records_go_to_stderr_with_seconds_and_the_level_below_is_dropped(capsys):
    logs.configure("WARNING")
    log = logging.getLogger("oppu.somewhere")
    log.info("not shown")
    log.warning("[stage] %d failed", 2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("s WARNING: [stage] 2 failed\n") and "not shown" not in captured.err
    logs.configure("INFO")  # again: one handler, the new level
    log.info("shown once")
    assert capsys.readouterr().err.count("shown once") == 1


def test_progress_without_a_terminal_logs_total_eta_and_failures_by_name(capsys, monkeypatch):
    logs.configure("INFO")
    monkeypatch.setattr(logs, "PROGRESS_INTERVAL_S", 0.0)
    with logs.progress(4, "evaluate", unit="users") as bar:
        bar.update(1)
        bar.update(1, failed="user07")
        bar.update(2, failed=["user09"])
    lines = capsys.readouterr().err.splitlines()
    assert "[evaluate] 1/4 users (25%)" in lines[0] and ", ETA " in lines[0]
    assert lines[1].endswith("; failed: user07") and "2/4 users (50%)" in lines[1]
    assert "4/4 users (100%)" in lines[2] and "ETA" not in lines[2]
    assert lines[3].endswith("WARNING: [evaluate] 2 of 4 users failed: user07, user09")


def test_progress_when_quiet_shows_only_the_failures(capsys):
    logs.configure("WARNING")
    with logs.progress(2, "train_users oppu", unit="users") as bar:
        bar.update(1)
        bar.update(1, failed="u2")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("WARNING: [train_users oppu] 1 of 2 users failed: u2")


def test_library_use_without_configure_prints_nothing(capsys):
    with logs.progress(1, "x") as bar:
        bar.update(1)
    logging.getLogger("oppu.pipeline").info("hidden")
    assert capsys.readouterr() == ("", "")
    assert logs.worker_env() == {}


def test_workers_get_the_level_and_no_transformers_bars_below_verbose():
    logs.configure("INFO")
    assert logs.worker_env() == {logs.LEVEL_ENV: "INFO", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    logs.configure("DEBUG")
    assert logs.worker_env() == {logs.LEVEL_ENV: "DEBUG"}


def test_a_submitted_jobs_own_env_vars_are_not_passed_again(monkeypatch):
    from oppu.pipeline import _job_runtime_env

    env = {logs.LEVEL_ENV: "INFO", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    assert _job_runtime_env(env) == {"env_vars": env}
    job = {"runtime_env": {"env_vars": {logs.LEVEL_ENV: "DEBUG"}, "working_dir": "."}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _job_runtime_env(env) == {"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}}
    assert _job_runtime_env({logs.LEVEL_ENV: "INFO"}) is None


def test_a_process_that_imports_oppu_with_the_level_set_logs_at_it():
    """What a Ray worker of a configured driver does: its oppu records reach its stderr."""
    code = "import logging, oppu; logging.getLogger('oppu.x').info('from a worker'); " \
           "logging.getLogger('oppu.x').debug('too fine')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), logs.LEVEL_ENV: "INFO"})
    assert run.returncode == 0, run.stderr
    assert "from a worker" in run.stderr and "too fine" not in run.stderr


NOTICE = ("[2026-01-01 10:00:00,000 E 7 7] core_worker.cc:2465: Actor with class name: "
          "'MapWorker(MapBatches(PersonalTrainer))' and ID: 'ab12' has constructor arguments in the object "
          "store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
          "the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
NATIVE = f"""
import os, sys
from oppu import logs
logs.configure(sys.argv[1])
print(logs.filter_native_stderr())
os.write(2, b"native before\\n{NOTICE}\\nnative after\\n")  # as Ray's core worker writes: to fd 2
print("python's own", file=sys.stderr)
logs.logger.info("a record")
"""


@pytest.mark.parametrize("level, filtered", [("INFO", True), ("WARNING", True), ("DEBUG", False)])
def test_native_notices_of_rays_core_worker_stay_off_stderr_unless_verbose(level, filtered):
    """Ray Data's pool actors draw the core worker's 'constructor arguments in the object store'
    notice on the driver's fd 2 (issue 20, item 4); every other line, native or Python, stays."""
    run = subprocess.run([sys.executable, "-c", NATIVE, level], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(filtered)
    assert ("constructor arguments in the object store" in run.stderr) is not filtered
    for line in ("native before", "native after", "python's own"):
        assert line in run.stderr
    assert ("a record" in run.stderr) is (level != "WARNING")


def test_the_native_filter_leaves_a_redirected_sys_stderr_alone(capsys):
    """Under pytest's capture (or an application's own stderr) nothing is rewired."""
    logs.configure("INFO")
    assert logs.filter_native_stderr() is False
