"""retro-pipeline: RETRO retrieval preprocessing at scale.

Importing this package is cheap: torch, ray, faiss and transformers load only when a stage needs them.
"""

__version__ = "0.1.0"

from retro_pipeline.errors import RetroError  # noqa: E402,F401
