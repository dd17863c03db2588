"""The encoder used by the pipeline and by its training tasks: load any Hugging Face encoder, pool, normalise,
embed in sorted batches. See :mod:`embedder.encoder`.

Importing this package is cheap: ``Encoder`` (and with it torch) loads on first use; ``embedder.errors`` and
``embedder.settings`` never import torch. Nothing here imports ``retro_pipeline``.
"""

from embedder.errors import UserError
from embedder.settings import POOLINGS, default_model_path

__all__ = ["Encoder", "POOLINGS", "UserError", "default_model_path"]


def __getattr__(name):
    if name == "Encoder":
        from embedder.encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")
