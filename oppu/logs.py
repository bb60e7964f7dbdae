"""Where the library's messages go: the ``oppu`` logger, its one level, and progress bars.

The library logs through ``logging.getLogger(__name__)`` and never configures logging itself; the
``oppu`` command and ``jobs/*.py`` call ``configure`` once, from ``-q/--quiet`` (warnings and
errors only), nothing (progress and one line per step) or ``-v/--verbose`` (everything, Ray's own
worker output too), or from ``$OPPU_LOG_LEVEL``:

    oppu -q quickstart                       OPPU_LOG_LEVEL=WARNING python jobs/train_users.py ...

Records go to stderr as ``<seconds since start>s <message>``; stdout holds only what a command
answers (tables, JSON, tokens). The level reaches Ray workers through ``worker_env`` (exported by
``oppu.pipeline.init_ray``): a process that imports ``oppu`` with ``OPPU_LOG_LEVEL`` set logs at
that level. Ray's own output (worker warnings, deprecations, transformers' "Loading weights" bars,
Ray Data's bars) stays in Ray's logs (``/tmp/ray/session_latest/logs``, ``ray job logs``) unless
verbose.

``progress(total, desc)`` is the one progress display: a tqdm bar with total and ETA on a terminal,
periodic log lines otherwise (CI logs stay readable), nothing under ``--quiet``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable

LEVEL_ENV = "OPPU_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROGRESS_INTERVAL_S = 15.0  # without a terminal, a progress line at most this often (and at the end)

logger = logging.getLogger("oppu")


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (pytest's capture, a redirected stream), and
    above a live tqdm bar rather than through it."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
            try:
                tqdm.tqdm.write(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 - logging must not raise
                self.handleError(record)
            return
        super().emit(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname}: {message}"
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return f"{record.relativeCreated / 1000:7.1f}s {message}"


def level_from(quiet: bool = False, verbose: bool = False) -> str:
    """The level the switches ask for; with neither, ``$OPPU_LOG_LEVEL`` or ``INFO``."""
    if quiet:
        return "WARNING"
    if verbose:
        return "DEBUG"
    level = os.environ.get(LEVEL_ENV, "INFO").upper()
    return level if level in LEVELS else "INFO"


def configure(level: str | None = None) -> str:
    """Send the ``oppu`` logger's records at ``level`` (default: ``level_from()``) to stderr.

    Idempotent; records still propagate to the root logger (pytest's ``caplog`` sees them), which
    prints nothing unless an application configured it. Returns the level set.
    """
    level = (level or level_from()).upper()
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    if level != "DEBUG":  # transformers' own bars ("Loading weights", "Writing model shards")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    return level


def configured_level() -> str | None:
    """The level ``configure`` set in this process, or None where logging was left alone."""
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return None
    return logging.getLevelName(logger.level)


def add_arguments(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` (one of them). With ``suppress_defaults`` an absent
    switch sets nothing, so a subcommand's parser does not undo the main parser's."""
    default = argparse.SUPPRESS if suppress_defaults else False
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="warnings and errors only, no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="debug messages, and Ray's worker output in this terminal")


def configure_from_args(args: argparse.Namespace) -> str:
    """``configure`` for a command line's ``-q``/``-v``; below verbose, the libraries' deprecation
    warnings are not shown (they are about Ray's, transformers' and peft's own code)."""
    level = configure(level_from(getattr(args, "quiet", False), getattr(args, "verbose", False)))
    _hide_library_warnings()
    return level


def _hide_library_warnings() -> None:
    if configured_level() in (None, "DEBUG"):
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")  # Ray Data's advice


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: this process's level, and no transformers bars unless verbose
    (``{}`` where logging was not configured here)."""
    level = configured_level()
    if level is None:
        return {}
    env = {LEVEL_ENV: level}
    if level != "DEBUG":
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


def verbose() -> bool:
    return configured_level() == "DEBUG"


def ray_logging_level() -> int:
    """``ray.init(logging_level=...)`` for the driver's "ray" logger: its INFO and WARNING lines
    ("Started a local Ray instance", ...) only when verbose, or where logging was left alone."""
    return logging.INFO if configured_level() in (None, "DEBUG") else logging.ERROR


def quiet_ray_terminal() -> None:
    """Ray Data's driver-side lines below ERROR ("Starting execution of Dataset ...") and the
    libraries' deprecation warnings off the terminal, unless verbose; Ray Data still writes its
    lines to its own log file (``/tmp/ray/session_latest/logs/ray-data``). Call after
    ``import ray.data`` (Ray's import puts its own warning filter first)."""
    if configured_level() in (None, "DEBUG"):
        return
    _hide_library_warnings()
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session file keeps all
            handler.setLevel(logging.ERROR)


# Lines that Ray's C++ core worker writes to the driver's stderr (fd 2) and that ask nothing of the
# user, as regular expressions over one line:
NATIVE_STDERR_NOISE = (
    # Ray Data (2.60) hands each pool actor its DataContext and map transformer as object refs, and
    # pool actors restart (max_restarts=-1), so the driver's first pool actor always draws Ray's
    # notice (ray-project/ray#53727) that a restart fails if those refs are lost; the driver holds
    # both for the pool's whole life, so a restarted actor finds them (the lost-worker drill).
    r"core_worker\.cc:\d+: Actor .*has constructor arguments in the object store and max_restarts > 0",
)
# The filter process: fd 2's lines, less the noise, to the real stderr; it ignores the terminal's
# signals and ends at end of input (when the driver and whatever inherited its fd 2 have exited),
# so nothing written before a crash is lost.
_FILTER_PROGRAM = """
import re, sys
noise = re.compile("|".join(sys.argv[1:]).encode())
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not noise.search(line):
        out.write(line)
        out.flush()
"""
_native_filter: subprocess.Popen | None = None


def filter_native_stderr() -> bool:
    """Keep ``NATIVE_STDERR_NOISE`` lines of native code (Ray's core worker) off this process's
    stderr, unless verbose; call before ``ray.init``. Returns whether the filter is on.

    Native code writes to file descriptor 2, below Python's ``sys.stderr``: fd 2 becomes a pipe
    into a small filter process that passes every other line on to the original stderr, and
    ``sys.stderr`` writes to the original stderr directly (logging, progress bars and tracebacks
    keep their terminal and order). The lines stay in Ray's own log of the driver
    (``python-core-driver-*.log``). Only where an entry point configured logging here and
    ``sys.stderr`` is still the process's own (not pytest's capture, not an application's).
    """
    global _native_filter
    if _native_filter is not None:
        return True
    if configured_level() in (None, "DEBUG") or sys.stderr is not sys.__stderr__:
        return False
    try:
        if sys.stderr.fileno() != 2:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        _native_filter = subprocess.Popen(
            [sys.executable, "-c", _FILTER_PROGRAM, *NATIVE_STDERR_NOISE], stdin=read_end,
            stdout=original, stderr=original, start_new_session=True)  # no Ctrl-C: it drains to the end
    except OSError:
        for fd in (original, read_end, write_end):
            os.close(fd)
        return False
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(original, "w", buffering=1, encoding=sys.__stderr__.encoding,  # noqa: SIM115
                      errors="backslashreplace")
    return True


def follow_serve_logging(level: str) -> None:
    """In a Ray Serve replica: the ``oppu`` logger writes where Serve's logger does (the replica's
    log file, in the app's ``log_encoding``), at ``level``."""
    serve_logger = logging.getLogger("ray.serve")
    logger.handlers[:] = list(serve_logger.handlers)
    logger.propagate = False
    logger.setLevel(level)


class Progress:
    """Progress of ``total`` items: a tqdm bar on a terminal, else a log line at most every
    ``PROGRESS_INTERVAL_S``; failures are named in the bar and, at the end, in one warning.

        with progress(len(users), "evaluate", unit="users") as bar:
            for user in ...:
                bar.update(1, failed=user.user_id if broken else None)
    """

    def __init__(self, total: int, desc: str, unit: str = "items"):
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.failed = 0, []
        self.started = self._last_line = time.monotonic()
        self.enabled = logger.isEnabledFor(logging.INFO)
        self._bar = None
        if self.enabled and configured_level() is not None and _terminal_columns() > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"[{desc}]", unit=f" {unit}", file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, failed: str | Iterable[str] | None = None) -> None:
        """``n`` more items done; ``failed`` names the failed ones among them (or later found)."""
        self.done += n
        if failed:
            self.failed.extend([failed] if isinstance(failed, str) else failed)
        if self._bar is not None:
            if self.failed:
                self._bar.set_postfix_str(f"failed: {self._names()}", refresh=False)
            self._bar.update(n)
        elif self.enabled and (self.done >= self.total
                               or time.monotonic() - self._last_line >= PROGRESS_INTERVAL_S):
            self._last_line = time.monotonic()
            logger.info("[%s] %s", self.desc, self.line())

    def line(self) -> str:
        """``5/12 users (42%), 31s, ETA 43s; failed: u7``"""
        elapsed = time.monotonic() - self.started
        text = f"{self.done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({self.done / self.total:.0%}), {elapsed:.0f}s"
        if 0 < self.done < self.total:
            text += f", ETA {elapsed / self.done * (self.total - self.done):.0f}s"
        if self.failed:
            text += f"; failed: {self._names()}"
        return text

    def _names(self, most: int = 10) -> str:
        names = ", ".join(self.failed[:most])
        return names + (f" and {len(self.failed) - most} more" if len(self.failed) > most else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.failed:
            logger.warning("[%s] %d of %d %s failed: %s", self.desc, len(self.failed), self.total,
                           self.unit, self._names(most=50))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _terminal_columns() -> int:
    """stderr's width when it is a terminal (0 for none, or a pseudo-terminal without a size)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError, AttributeError):
        return 0


def progress(total: int, desc: str, unit: str = "items") -> Progress:
    """A progress display of ``total`` items named ``desc`` (see ``Progress``)."""
    return Progress(total, desc, unit)

