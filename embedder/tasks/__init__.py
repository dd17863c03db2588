"""Training tasks, by name: each a :class:`embedder.tasks.base.Task` the one training loop runs."""

from __future__ import annotations

TASK_MODULES = {
    "retromae": "embedder.tasks.retromae",
    "retroar": "embedder.tasks.retroar",
    "contrastive": "embedder.tasks.contrastive",
    "custom": "embedder.tasks.custom",
    "mlm": "embedder.tasks.mlm",
}


def register_task(name: str, module: str) -> None:
    """Make the task of ``module`` (a module defining ``TASK``, a :class:`embedder.tasks.base.Task` subclass,
    and importing no torch) known as ``name``: `train --task name`, its options and help."""
    TASK_MODULES[name] = module


def unregister_task(name: str) -> None:
    TASK_MODULES.pop(name, None)


def options_by_task() -> dict[str, list[str]]:
    """Option name -> the tasks that take it, in registry order."""
    out: dict[str, list[str]] = {}
    for name in TASK_MODULES:
        for o in get_task(name).OPTIONS:
            out.setdefault(o.name, []).append(name)
    return out


def get_task(name: str):
    """The Task class of ``name`` (its module imported on demand; task modules import no torch)."""
    import importlib

    from embedder.errors import UserError

    if name not in TASK_MODULES:
        raise UserError(f"unknown task {name!r}; use one of {', '.join(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK


def task_class(task):
    """The Task class of ``task``: a registered name, or a :class:`embedder.tasks.base.Task` subclass as it is."""
    from embedder.errors import UserError
    from embedder.tasks.base import Task

    if isinstance(task, str):
        return get_task(task)
    if isinstance(task, type) and issubclass(task, Task):
        return task
    raise UserError(f"task {task!r}: give a task name or a Task subclass")
