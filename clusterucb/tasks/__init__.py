"""Target tasks, one module each (``TASK`` in ``clusterucb/tasks/<name>.py``); see ``base`` for what a task provides.

The registry is the set of task modules: adding a task is adding a module (and
its name to the ``task`` enum of ``config.schema.yaml``). Modules are imported
on first use only.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from clusterucb.tasks.base import TargetTask, TaskSettings, resolve_settings

NOT_TASKS = {"base", "sandbox", "sandbox_bootstrap"}  # the HumanEval sandbox lives here too


@cache
def task_names() -> tuple[str, ...]:
    """Every task module's name, sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in NOT_TASKS))


def get_task(name: str) -> TargetTask:
    if name not in task_names():
        raise ValueError(f"unknown target task {name!r} (known: {', '.join(task_names())})")
    return importlib.import_module(f"{__name__}.{name}").TASK


__all__ = ["TargetTask", "TaskSettings", "get_task", "resolve_settings", "task_names"]
