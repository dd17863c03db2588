"""Chunks of GPT tokens: cutting documents into chunks and turning chunks into text, in bulk.

This is the one code path from GPT tokens to text shared by db-build (which re-tokenizes the text with
the embedder's tokenizer to find empty chunks) and by embedding (which feeds the text to the encoder).
Everything is numpy over whole blocks; the only per-chunk Python work is inside the tokenizer calls.
"""

from __future__ import annotations

import numpy as np


def doc_lengths_without_eod(tokens: np.ndarray, offsets: np.ndarray, eod: int) -> np.ndarray:
    """Lengths of the documents ``tokens[offsets[i]:offsets[i+1]]`` after dropping one trailing EOD."""
    lengths = np.diff(offsets).astype(np.int64)
    nonempty = lengths > 0
    last = np.zeros(len(lengths), dtype=bool)
    if nonempty.any():
        last[nonempty] = tokens[offsets[1:][nonempty] - 1] == eod
    return lengths - last


def chunk_spans(doc_lengths: np.ndarray, chunk_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents into chunks at ``range(0, len, chunk_length)``.

    Returns ``(doc_index, start, end)`` per chunk, in document order; ``doc_index`` indexes ``doc_lengths``
    and ``start``/``end`` (exclusive) are token offsets inside the document.
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    n_per_doc = (doc_lengths + chunk_length - 1) // chunk_length
    doc_index = np.repeat(np.arange(len(doc_lengths), dtype=np.int64), n_per_doc)
    first = np.cumsum(n_per_doc) - n_per_doc
    within = np.arange(len(doc_index), dtype=np.int64) - np.repeat(first, n_per_doc)
    start = within * chunk_length
    end = np.minimum(start + chunk_length, doc_lengths[doc_index])
    return doc_index, start, end


def gather_spans(tokens: np.ndarray, abs_start: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``tokens[abs_start[i] : abs_start[i] + lengths[i]]`` for all i.

    Returns the flat token array and offsets ``[n + 1]`` into it.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] == 0:
        return np.zeros(0, dtype=tokens.dtype), offsets
    idx = np.arange(offsets[-1], dtype=np.int64) + np.repeat(np.asarray(abs_start, np.int64) - offsets[:-1], lengths)
    return np.asarray(tokens[idx]), offsets


def chunk_texts(gpt, tokens: np.ndarray, abs_start: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Text of each chunk: its GPT tokens gathered and detokenized in one batch."""
    flat, offsets = gather_spans(tokens, abs_start, lengths)
    return gpt.detokenize_flat(flat, offsets)


def bert_lengths(bert_tokenizer, texts: list[str]) -> np.ndarray:
    """Embedder-token count of each text (no special tokens, no truncation), tokenized in parallel batches."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    encode = getattr(bert_tokenizer, "encode_batch_fast", bert_tokenizer.encode_batch)
    encs = encode(texts, add_special_tokens=False)
    return np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
