"""Declared options, the one kind for both packages: a pipeline stage's options
(:class:`retro_pipeline.stage.Option`) and a training task's (:class:`embedder.tasks.base.Task`). The command
line, config keys and checks all come from these declarations. Nothing here imports torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from embedder.errors import UserError


@dataclass(frozen=True)
class Option:
    """One declared option: a CLI flag (``--`` + ``name`` with ``-`` for ``_``), a config key, and (if
    ``changes_output``) part of what a run's result depends on: a pipeline stage's ``config.json`` key, a
    training task's resume check.

    ``type`` is int, float, str or bool (a bool is a flag); ``minimum``/``maximum``/``choices`` bound it. ``normalize``
    turns a checked value into its canonical, stored form (raise :class:`UserError` for a bad one). A bad value
    is an ``error`` (:class:`UserError` here; the pipeline's stages raise its own subclass).
    ``path`` marks a value that may name a file or directory: it is stored as an absolute path when it
    exists, so the CLI and the Python API store the same value and the workdir works from anywhere.
    """

    name: str  # the Python / config key, e.g. "chunk_length"; the flag is --chunk-length
    type: type
    default: Any
    help: str
    changes_output: bool = True
    minimum: float | None = None
    open_minimum: bool = False  # minimum itself not allowed
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    normalize: Callable[[Any], Any] | None = None
    path: bool = False
    shown_default: str | None = None  # the default as --help says it, when repr(default) would not do

    error: ClassVar[type[Exception]] = UserError

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` (from the command line, a config file or the Python API) as this option stores it."""
        if value is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise self.error(f"{self.flag} {value!r}: give true or false")
        elif self.type in (int, float):
            try:
                if isinstance(value, bool) or (self.type is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = self.type(value)
            except (TypeError, ValueError):
                raise self.error(f"{self.flag} {value!r}: not {'an integer' if self.type is int else 'a number'}")
            if self.minimum is not None and (value < self.minimum or (self.open_minimum and value == self.minimum)):
                raise self.error(f"{self.flag} {value}: must be {'above' if self.open_minimum else 'at least'} "
                                 f"{self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise self.error(f"{self.flag} {value}: must be at most {self.maximum:g}")
        elif self.type is str and not isinstance(value, (str, list, tuple, os.PathLike)):
            value = str(value)
        if self.choices is not None and value not in self.choices and value != self.default:
            raise self.error(f"{self.flag} {value!r}: choose one of {', '.join(self.choices)}")
        if self.path and isinstance(value, (str, os.PathLike)) and value and \
                os.path.exists(os.path.expanduser(str(value))):
            value = os.path.abspath(os.path.expanduser(str(value)))
        if self.normalize is not None:
            value = self.normalize(value)
        return value
