"""Training tasks, by name: each a :class:`embedder.tasks.base.Task` the one training loop runs."""

from __future__ import annotations

TASK_MODULES = {
    "retromae": "embedder.tasks.retromae",
    "retroar": "embedder.tasks.retroar",
    "contrastive": "embedder.tasks.contrastive",
    "custom": "embedder.tasks.custom",
    "mlm": "embedder.tasks.mlm",
}


def get_task(name: str):
    """The Task class of ``name`` (imported on demand: torch and transformers load only here)."""
    import importlib

    from embedder.errors import UserError

    if name not in TASK_MODULES:
        raise UserError(f"unknown task {name!r}; use one of {', '.join(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK
