"""The user-facing error type shared by the embedder and the pipeline (no heavy imports).

A :class:`UserError` is an expected mistake (a bad path, a bad option, a model that cannot load); its
message is one line naming what, where and how to fix it. Front ends print it without a traceback.
``retro_pipeline.errors.RetroError`` derives from it, so one ``except UserError`` catches both.
"""


class UserError(Exception):
    """An expected, user-facing error: one line saying what, where and how to fix it."""
