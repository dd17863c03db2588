"""The encoder used by the pipeline and by its training tasks: load any Hugging Face encoder, pool, normalise,
embed in sorted batches. See :mod:`embedder.encoder`.

Importing this package imports torch (never ray or faiss); transformers loads when a model does.
"""

from embedder.encoder import POOLINGS, Encoder, default_model_path

__all__ = ["Encoder", "POOLINGS", "default_model_path"]
