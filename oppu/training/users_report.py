"""What the train_users job reports: one ``UserResult`` a user, and ``reports/train_users-<variant>.json``
(``reports/migrate_users-<variant>.json`` for a base upgrade's migration, ``oppu.migration``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from oppu import fsutil
from oppu.run_config import RunConfig

RESULT_FIELDS = ("user_id", "status", "version", "samples", "tokens", "seconds", "loss", "error")


@dataclass
class UserResult:
    user_id: str
    status: str  # "trained", "skipped" (adapter for the same data and config exists) or "failed"
    version: str = ""
    samples: int = 0
    tokens: int = 0  # all tokens processed (the report's tokens per second)
    seconds: float = 0.0
    loss: float = float("nan")
    error: str = ""


def result_columns(results: list[UserResult]) -> dict[str, list]:
    """Results as the columns of a Ray Data batch (``RESULT_FIELDS``)."""
    return {name: [getattr(r, name) for r in results] for name in RESULT_FIELDS}


def result_of_row(row: dict) -> UserResult:
    """A ``UserResult`` back from a row of the actors' output (numpy scalars made plain)."""
    return UserResult(**{name: _plain(row[name]) for name in RESULT_FIELDS})


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def report_path(run_dir: str, variant: str, stage: str = "train_users") -> str:
    return fsutil.join(run_dir, "reports", f"{stage}-{variant.replace('+', '_')}.json")


def write_report(cfg: RunConfig, variant: str, results: list[UserResult], seconds: float,
                 stage: str = "train_users") -> None:
    trained = [r for r in results if r.status == "trained"]
    tokens = sum(r.tokens for r in trained)
    busy = sum(r.seconds for r in trained)
    report = {"variant": variant, "task": cfg.task, "seconds": seconds,
              "trained": len(trained), "skipped": sum(r.status == "skipped" for r in results),
              "failed": sum(r.status == "failed" for r in results),
              "tokens_per_s_per_actor": tokens / busy if busy else None,
              "users": [asdict(r) for r in results]}
    fsutil.write_json(report_path(cfg.run_dir, variant, stage), report)


def load_report(run_dir: str, variant: str, stage: str = "train_users") -> dict:
    return fsutil.read_json(report_path(run_dir, variant, stage))
