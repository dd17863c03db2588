"""Chunks of GPT tokens: cutting documents into chunks and turning chunks into text, in bulk.

This is the one code path from GPT tokens to text shared by db-build (which re-tokenizes the text with
the embedder's tokenizer to find empty chunks) and by embedding (which feeds the text to the encoder).
Everything is numpy over whole blocks; the only per-chunk Python work is inside the tokenizer calls.
"""

from __future__ import annotations

import json
import re

import numpy as np

from retro_pipeline import arrays


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
    first = arrays.offsets(n_per_doc)[:-1]
    within = np.arange(len(doc_index), dtype=np.int64) - np.repeat(first, n_per_doc)
    start = within * chunk_length
    end = np.minimum(start + chunk_length, doc_lengths[doc_index])
    return doc_index, start, end


def chunk_texts(gpt, tokens: np.ndarray, abs_start: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Text of each chunk ``tokens[abs_start[i] : abs_start[i] + lengths[i]]``, detokenized in one batch."""
    abs_start = np.asarray(abs_start, dtype=np.int64)
    return gpt.detokenize_flat(tokens, np.stack([abs_start, abs_start + np.asarray(lengths, np.int64)], axis=1))


class BertLengths:
    """Embedder-token count of each text (no special tokens, no truncation), exactly as the tokenizer counts.

    For the common BERT tokenizer (BertNormalizer, BertPreTokenizer, WordPiece) the pre-tokenizer splits at
    whitespace before anything else, so a text of printable ASCII counts as the sum of the counts of its
    whitespace-separated pieces (each piece is then split at punctuation and into word pieces, as alone).
    Piece counts are cached: a block's texts are counted with one ``str.split`` and dict look-ups, and the
    Rust tokenizer counts only the pieces it has not seen. Every other text (non-ASCII, control characters,
    a special token's text inside it) and every other kind of tokenizer goes to the Rust tokenizer's
    parallel batch encoder. Tests compare both paths with the tokenizer on real and awkward text.
    """

    SEP = "\x01"  # never inside a simple text (it is a control character)
    UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
    MAX_CACHE = 1_000_000

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        spec = json.loads(tokenizer.to_str())
        norm, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        self.fast = (norm.get("type") == "BertNormalizer" and pre.get("type") == "BertPreTokenizer"
                     and model.get("type") == "WordPiece")
        self.lowercase = bool(norm.get("lowercase"))
        self.specials = sorted({t["content"].lower() for t in spec.get("added_tokens") or [] if t.get("content")})
        self.cache: dict[str, int] = {}

    def _rust(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.int64)
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encs = encode(texts, add_special_tokens=False)
        return np.fromiter((len(e) for e in encs), dtype=np.int64, count=len(encs))

    def _special_hits(self, simple: list[int], texts: list[str], low: str) -> set[int]:
        """Positions in ``simple`` of texts that contain a special token's text (any case)."""
        starts = arrays.offsets([len(texts[i]) + 3 for i in simple])[:-1]  # where each text starts in ``low``
        hit = set()
        for sp in self.specials:
            pos = low.find(sp)
            while pos >= 0:
                hit.add(int(np.searchsorted(starts, pos, side="right")) - 1)
                pos = low.find(sp, pos + 1)
        return hit

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not self.fast:
            return self._rust(texts)
        unsafe = self.UNSAFE.search
        simple = [i for i, t in enumerate(texts) if t.isascii() and not unsafe(t)]
        joiner = f" {self.SEP} "
        big = joiner.join([texts[i] for i in simple])
        low = big.lower()
        if self.specials:
            hit = self._special_hits(simple, texts, low)
            if hit:
                simple = [i for k, i in enumerate(simple) if k not in hit]
                big = joiner.join([texts[i] for i in simple])
                low = big.lower()
        pieces = (low if self.lowercase else big).split()
        if len(self.cache) > self.MAX_CACHE:
            self.cache.clear()
        cache = self.cache
        cache[self.SEP] = -1
        vals = list(map(cache.get, pieces))
        if None in vals:
            new = sorted({w for w, v in zip(pieces, vals) if v is None})
            for w, n in zip(new, self._rust(new)):
                cache[w] = int(n)
            vals = list(map(cache.__getitem__, pieces))
        v = np.array(vals, dtype=np.int64)
        seps = np.flatnonzero(v < 0)
        v[seps] = 0
        csum = arrays.offsets(v)
        out = np.zeros(len(texts), dtype=np.int64)
        if simple:
            out[simple] = csum[np.append(seps, len(v))] - csum[np.insert(seps + 1, 0, 0)]
        rest = np.setdiff1d(np.arange(len(texts)), simple)
        out[rest] = self._rust([texts[i] for i in rest])
        return out
