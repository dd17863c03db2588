"""Small numpy helpers shared by the corpus, chunk and tokenizer code."""

from __future__ import annotations

import numpy as np


def offsets(lengths) -> np.ndarray:
    """Boundaries of pieces of the given lengths laid end to end: int64[n+1], starting at 0.

    Piece i is ``flat[off[i]:off[i+1]]``; ``off[:-1]`` are the starts (the exclusive cumulative sum) and
    ``off[-1]`` is the total. Booleans count as 0/1.
    """
    lengths = np.asarray(lengths)
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths.reshape(-1), dtype=np.int64, out=out[1:])
    return out
