"""Token masking for the pre-training tasks (numpy, vectorised; no torch).

Everything random here is drawn from the ``numpy.random.Generator`` passed in, and always the same number of
draws for a given batch shape (whatever the ids), so a micro-batch masks the same way whichever process
collates it (the determinism contract of :mod:`embedder.tasks.base`).

- :func:`mask_tokens`: BERT's masked-LM corruption. Of each row's maskable positions (those that
  ``special_mask`` does not mark: [CLS]/[SEP]/padding and any other position that must stay as it is),
  exactly ``round(ratio * n)`` (at least one when the row has any) are selected, uniformly at random; a
  selected position becomes [MASK] with probability 0.8, a random token with 0.1, and stays unchanged with
  0.1. Its label is the original id; every other label is -100 (:data:`IGNORE`).
- :func:`enhanced_decoding_mask`: RetroMAE's per-row attention matrix of the enhanced decoder (which key
  positions of the content stream each query position may attend to).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

IGNORE = -100
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1   # of the selected positions; the rest (0.1) stays unchanged


def _pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.shape != a.shape:
        raise ValueError(f"{what} needs two [B, L] arrays of one shape, got {a.shape} and {b.shape}")
    return a, b


def mask_tokens(ids, special_mask, ratio: float, rng: np.random.Generator, mask_id: int, vocab_size: int,
                exclude_ids: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Masked-LM corruption of a [B, L] batch of token ids -> (inputs [B, L] int64, labels [B, L] int64).

    ``special_mask`` [B, L] (truthy = never selected: special tokens and padding). Each row with ``n``
    maskable positions gets ``max(1, round(ratio * n))`` of them selected (none when ``n`` is 0; ``round`` is
    Python's, half to even), every subset of that size equally likely. Selected positions: 80% become
    ``mask_id``, 10% a token drawn uniformly from ``range(vocab_size)`` minus ``exclude_ids``, 10% stay.
    Labels are the original id at selected positions and -100 everywhere else. Draws, in order: uniforms
    [B, L] (the selection), uniforms [B, L] (the 80/10/10 choice), integers [B, L] (the random tokens).
    """
    ids, special = _pair(ids, special_mask, "mask_tokens")
    ids = ids.astype(np.int64, copy=False)
    special = special.astype(bool)
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"mask ratio {ratio!r} must be within [0, 1]")
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    maskable = ~special
    n = maskable.sum(axis=1)                                            # [B]
    k = np.where(n > 0, np.maximum(1, np.rint(float(ratio) * n)), 0).astype(np.int64) if ratio > 0 else \
        np.zeros_like(n)
    # a uniformly random order of each row's maskable positions (the rest sort last), first k selected
    scores = np.where(maskable, rng.random(ids.shape), 2.0)
    rank = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
    selected = (rank < k[:, None]) & maskable
    choice = rng.random(ids.shape)
    pool = np.arange(vocab_size, dtype=np.int64)
    exclude = np.fromiter((int(i) for i in exclude_ids if i is not None), dtype=np.int64)
    if exclude.size:
        pool = np.setdiff1d(pool, exclude)
        if pool.size == 0:
            raise ValueError("no token is left to draw random replacements from")
    random_tokens = pool[rng.integers(0, pool.size, size=ids.shape)]
    labels = np.where(selected, ids, IGNORE)
    inputs = ids.copy()
    to_mask = selected & (choice < MASK_SHARE)
    to_random = selected & (choice >= MASK_SHARE) & (choice < MASK_SHARE + RANDOM_SHARE)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_tokens[to_random]
    return inputs, labels


def enhanced_decoding_mask(attention_mask, special_mask, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """RetroMAE's enhanced-decoding attention: bool [B, L, L], ``[b, i, j]`` = query position i of row b may
    attend to key position j of the content stream (True = visible).

    For each query position i, each non-special real token j is hidden with probability ``ratio``, drawn
    independently per (row, i, j) (one draw: uniforms [B, L, L]); then

    - padding (``attention_mask`` 0) is never visible;
    - no position sees itself (i != j), so no token is reconstructed from its own embedding;
    - position 0 (the [CLS] slot, which carries the sentence embedding) is visible to every other position;
    - special tokens ([SEP]) are never hidden, as in the reference, which masks word pieces only.

    Query rows at padding see position 0 only (their outputs carry no label). Query 0 ([CLS], no label) sees
    the non-hidden others; in the degenerate row where that is nothing (no other visible token) it sees
    itself, so that no attention row is empty.
    """
    valid, special = _pair(attention_mask, special_mask, "enhanced_decoding_mask")
    valid, special = valid.astype(bool), special.astype(bool)
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"decoder mask ratio {ratio!r} must be within [0, 1]")
    b, length = valid.shape
    hideable = valid & ~special                                         # [B, L]
    hidden = (rng.random((b, length, length)) < ratio) & hideable[:, None, :]
    visible = valid[:, None, :] & ~hidden                               # [B, Lq, Lk]
    visible &= ~np.eye(length, dtype=bool)[None]
    visible[:, 1:, 0] = True                                            # the sentence embedding, for all others
    pad_rows = ~valid                                                   # [B, Lq]
    visible[pad_rows] = False
    visible[pad_rows, 0] = True
    empty = ~visible[:, 0, :].any(axis=1)
    visible[empty, 0, 0] = True
    return visible
