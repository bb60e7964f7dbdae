"""The task registry: ``get_task("LaMP-2M")`` gives the one ``Task`` that owns everything about it."""

from __future__ import annotations

from oppu.errors import ConfigError
from oppu.tasks.base import Task, TrainingSample
from oppu.tasks.lamp import ALL_TASKS

__all__ = ["TASK_NAMES", "Task", "TrainingSample", "get_task"]

TASK_NAMES: tuple[str, ...] = tuple(task.name for task in ALL_TASKS)

_TASKS_BY_KEY = {task.name.casefold(): task for task in ALL_TASKS}


def get_task(name: str | Task) -> Task:
    """The task named ``name``: ``LaMP-2M``, ``LaMP_2M`` and ``lamp-2m`` all name LaMP-2M; a Task is returned as is."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().replace("_", "-").casefold()
    if key in _TASKS_BY_KEY:
        return _TASKS_BY_KEY[key]
    if key == "lamp-6":
        raise ConfigError("task 'LaMP-6' (email subject generation) is private data: not supported; "
                          f"choose one of {', '.join(TASK_NAMES)}")
    hint = " (LaMP-2 is ambiguous: LaMP-2N is news, LaMP-2M is movies)" if key == "lamp-2" else ""
    raise ConfigError(f"unknown task {name!r}{hint}; choose one of {', '.join(TASK_NAMES)}")
