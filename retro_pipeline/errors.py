"""Errors meant for people.

A :class:`RetroError` is an expected mistake (bad input, bad option, conflicting rerun). Its message is one
line naming the file or option, the problem and the fix; the CLI prints it without a traceback and exits 2.
Anything else is a bug and keeps its traceback. It derives from :class:`embedder.errors.UserError`, the
embedder's own user-facing error, so that ``except UserError`` catches the mistakes of both packages.
"""

from embedder.errors import UserError


class RetroError(UserError):
    """An expected, user-facing error: one line saying what, where and how to fix it."""


class StageFailed(Exception):
    """Stage code raised an unexpected exception (a bug, or data the code did not foresee). It would fail the
    same way again, so it is not retried: the run stops with this one-line summary; the traceback is logged."""


class DependencyError(RetroError):
    """An optional dependency is missing; the message names the extra to install."""


def require(module: str, extra: str):
    """Import ``module`` or raise a :class:`DependencyError` naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised only where the package is absent
        raise DependencyError(
            f"the Python module '{module}' is not installed ({e}); "
            f"install it with: pip install 'retro-pipeline[{extra}]'"
        ) from None
