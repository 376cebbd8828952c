"""The tasks, by name: ``TASKS["segmentation"]``, ``TASKS["reconstruction"]``.

Each is a :class:`~mri_ensemble.tasks.base.Task` that owns what differs between tasks
(data, training set-up, metric, ensemble objective and fusion, predict I/O, cost inputs,
report columns); callers ask the task instead of branching on its name.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Task
from .reconstruction import RECONSTRUCTION
from .segmentation import SEGMENTATION

TASKS: dict[str, Task] = {t.name: t for t in (SEGMENTATION, RECONSTRUCTION)}


def get_task(name: str) -> Task:
    """The task called ``name``; ConfigError naming the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "get_task"]
