"""Index sizing from the database size: IVF lists and the ``auto`` choice of --index-ntrain (the ``auto``
index string, which also weighs --index-memory, is ``faiss_index.auto_index_str``).

Faiss k-means wants at least 39 training vectors per list (it refuses fewer than one); ``auto`` takes
64 per list, capped by the number of train chunks.
"""

from __future__ import annotations

import math


def auto_nlist(n_chunks: int) -> int:
    """IVF lists for a DB of ``n_chunks``: 0 means a Flat index (no lists)."""
    if n_chunks < 20_000:
        return 0
    if n_chunks < 1_000_000:
        return 1 << round(math.log2(8 * math.sqrt(n_chunks)))  # a power of two near 8·sqrt(N)
    if n_chunks < 10_000_000:
        return 65536
    if n_chunks < 100_000_000:
        return 262144
    return 4194304


def auto_ntrain(n_chunks: int) -> int:
    """Training vectors for ``auto``: all chunks of a small DB, else 64 per IVF list."""
    nlist = auto_nlist(n_chunks)
    if nlist == 0:
        return n_chunks
    return min(n_chunks, 64 * nlist)
