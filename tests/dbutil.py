"""Test helpers: synthetic corpora with the edge cases db-build must handle, and a pure-Python reference."""

from __future__ import annotations

import h5py
import numpy as np


def edge_case_docs(gpt, texts: list[str], chunk_length: int, n_docs: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Documents (token arrays, EOD-terminated unless noted) covering every chunking case."""
    rng = np.random.default_rng(seed)
    eod = gpt.eod_id
    enc = gpt.encode_batch(texts)
    pool = np.concatenate(enc)
    blank = gpt.encode_batch([" \n \n   \n" * 200])[0]  # text that is empty in a BERT vocabulary
    docs = [
        np.array([eod]),                                  # empty document
        np.array([], dtype=np.int64),                     # zero tokens, not even EOD
        np.append(pool[:1], eod),                         # one token
        np.append(pool[: chunk_length - 1], eod),         # shorter than a chunk
        np.append(pool[: chunk_length], eod),             # exactly one chunk
        np.append(pool[: 3 * chunk_length], eod),         # exact multiple
        pool[100: 100 + 2 * chunk_length + 5],            # no trailing EOD
        np.append(blank[: 3 * chunk_length], eod),        # only whitespace: every chunk invalid
        np.concatenate([pool[:chunk_length], blank[:chunk_length], pool[:10], [eod]]),  # invalid in the middle
    ]
    while len(docs) < n_docs:
        t = enc[int(rng.integers(len(enc)))]
        n = int(rng.integers(1, min(len(t), 6 * chunk_length) + 1))
        docs.append(np.append(t[:n], eod))
    order = rng.permutation(len(docs))
    return [np.asarray(docs[i], dtype=np.int64) for i in order]


def random_size_corpus(prefix, gpt, texts, seed: int, sizes, max_docs: int) -> str:
    """Real text cut into up to ``max_docs`` EOD-terminated documents of seeded random ``sizes`` (GPT tokens),
    written as the indexed dataset ``prefix``."""
    from retro_pipeline.corpus import write_indexed_dataset

    rng = np.random.default_rng(seed)
    stream = np.concatenate(gpt.encode_batch(texts))
    docs, pos = [], 0
    while pos < len(stream) and len(docs) < max_docs:
        n = int(rng.choice(sizes))
        docs.append(np.append(stream[pos:pos + n], gpt.eod_id))
        pos += n
    write_indexed_dataset(str(prefix), docs, np.uint16)
    return str(prefix)


def reference_block(gpt_tok, bert_tok, docs, doc_range, chunk_length, eod):
    """Megatron's per-chunk loop, written plainly: detokenize, retokenize, classify."""
    valid, invalid, offsets, total = [], [], [], 0
    for doc_id in range(*doc_range):
        doc = [int(x) for x in docs[doc_id]]
        if doc and doc[-1] == eod:
            doc = doc[:-1]
        for s in range(0, len(doc), chunk_length):
            e = min(len(doc), s + chunk_length)
            text = gpt_tok.decode(doc[s:e], skip_special_tokens=True)
            n = len(bert_tok.encode(text, add_special_tokens=False).ids)
            (valid if n else invalid).append((doc_id, s, e, n))
            total += bool(n)
        offsets.append((doc_id, total))
    as_arr = lambda rows, w: np.array(rows, dtype=np.uint64 if w == 2 else np.uint32).reshape(-1, w)  # noqa: E731
    return as_arr(valid, 4), as_arr(invalid, 4), as_arr(offsets, 2)


def read_h5(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}
