"""Scoring predictions against golds by id, from memory or from LaMP outputs-format files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from oppu.errors import ConfigError, DataError
from oppu.tasks import Task, get_task

_IDS_SHOWN = 10


def _id_list(ids: set[str]) -> str:
    shown = sorted(ids)[:_IDS_SHOWN]
    more = f" and {len(ids) - _IDS_SHOWN} more" if len(ids) > _IDS_SHOWN else ""
    return ", ".join(repr(i) for i in shown) + more


def score_predictions(task: Task | str, golds: Mapping[str, str], preds: Mapping[str, str],
                      *, preds_file: str | None = None) -> dict[str, float]:
    """LaMP's metrics for ``task`` over predictions keyed by query id; the id sets must be equal."""
    task = get_task(task)
    missing = set(golds) - set(preds)
    extra = set(preds) - set(golds)
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} gold id(s) without a prediction: {_id_list(missing)}")
        if extra:
            problems.append(f"{len(extra)} prediction id(s) not among the golds: {_id_list(extra)}")
        raise DataError(f"{task.name}: prediction ids do not match gold ids; " + "; ".join(problems),
                        file=preds_file)
    ids = list(golds)
    return task.score([golds[i] for i in ids], [preds[i] for i in ids])


def _check_file_task(file_task: object, expected: Task, file: str) -> None:
    # LaMP's own files call both LaMP-2 versions "LaMP_2" (the news one was renamed later).
    if str(file_task).replace("-", "_").casefold() == "lamp_2" and expected.name in ("LaMP-2N", "LaMP-2M"):
        return
    try:
        named = get_task(str(file_task))
    except ConfigError as exc:
        raise DataError(f"the file's task is not a supported task: {exc}", file=file, field="task") from None
    if named != expected:
        raise DataError(f"the file is for {named.name}, not {expected.name}", file=file, field="task")


def read_outputs_file(path: str | Path, task: Task | str | None = None) -> dict[str, str]:
    """``{id: output}`` from a LaMP outputs-format file (``{"task", "golds": [{"id", "output"}]}``).

    With ``task`` given, the file's ``task`` field (``LaMP_2M`` or ``LaMP-2M``) must name it.
    """
    file = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise DataError("file not found", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read file: {exc}", file=file) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", file=file) from None
    if not isinstance(document, dict) or not isinstance(document.get("golds"), list):
        raise DataError('expected a JSON object {"task": ..., "golds": [{"id": ..., "output": ...}]}',
                        file=file, field="golds")
    if task is not None and "task" in document:
        _check_file_task(document["task"], get_task(task), file)
    outputs: dict[str, str] = {}
    for position, entry in enumerate(document["golds"]):
        if not isinstance(entry, dict) or "id" not in entry or "output" not in entry:
            raise DataError(f"entry {position} of golds needs an 'id' and an 'output'", file=file,
                            field="golds")
        record = str(entry["id"])
        output = entry["output"]
        if isinstance(output, bool) or not isinstance(output, str | int | float):
            raise DataError(f"output must be text, got {type(output).__name__}", file=file,
                            record=record, field="output")
        if record in outputs:
            raise DataError("duplicate id", file=file, record=record, field="id")
        outputs[record] = str(output)
    return outputs


def score_files(task: Task | str, golds_path: str | Path, preds_path: str | Path) -> dict[str, float]:
    """LaMP's metrics for a predictions file against a golds file, both in LaMP's outputs format."""
    golds = read_outputs_file(golds_path, task)
    preds = read_outputs_file(preds_path, task)
    try:
        return score_predictions(task, golds, preds, preds_file=str(preds_path))
    except DataError as exc:
        if exc.file is not None:
            raise
        # Errors about the golds themselves (a gold rating that is no number, no golds at all).
        raise DataError(str(exc), file=str(golds_path), field="output") from None
