"""The user-facing error type shared by the embedder and the pipeline (no heavy imports).

A :class:`UserError` is an expected mistake (a bad path, a bad option, a model that cannot load); its
message is one line naming what, where and how to fix it. Front ends print it without a traceback.
``retro_pipeline.errors.RetroError`` derives from it, so one ``except UserError`` catches both.
"""


class UserError(Exception):
    """An expected, user-facing error: one line saying what, where and how to fix it."""


def first_line(e: BaseException) -> str:
    """``"Type: message"`` of an exception for a one-line error: its type and the first non-empty line of its
    message, whole (plus the next line when the first only introduces it, as in "Validation error for field
    'x':"); just the type when the message is empty."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(e).__name__}: {text}"
