"""Task registry: each task module registers instances here when it is imported."""

from __future__ import annotations

from ahamoment.registry import Registry
from ahamoment.tasks.base import Problem, Task, TraceNoise, Verdict

TASKS = Registry[Task]("task")


def get_task(name: str) -> Task:
    """The registered task ``name`` (or an import path ``pkg.mod:instance``)."""
    return TASKS.get(name)


# Imported last so that the modules can register into TASKS above.
from ahamoment.tasks import arithmetic, code, countdown, math  # noqa: E402, F401

__all__ = ["TASKS", "Problem", "Task", "TraceNoise", "Verdict", "get_task"]
