"""Retrieval evaluation of an encoder on pair rows, and hard-negative mining.

Both search exactly (inner product on L2-normalised embeddings, i.e. cosine; faiss ``IndexFlatIP`` when faiss
is installed, else numpy) over the *corpus* of the rows: every distinct document among their positives and
negatives (distinct by :func:`embedder.data.doc_key`, first occurrence kept, in file order). Ties are broken
by corpus order (the earlier document first), whichever backend searches.

A query is a distinct query text: rows with the same query are one query, its relevant documents the union of
their positives (every listed ``pos``, deduplicated). Metrics (binary relevance, averaged over queries):

- ``mrr@k``: 1 / rank of the first relevant document within the top k, else 0;
- ``recall@n``: the share of the query's relevant documents in its top n (n = 1, k, 100), which is the hit
  rate when a query has one relevant document (the common case);
- ``ndcg@k``: sum over relevant documents at rank r <= k of 1/log2(r + 1), divided by the same for the ideal
  ranking (all min(#relevant, k) relevant documents first).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from embedder.data import doc_key, pair_rows


def _encode(encoder, texts: list[str], batch_size: int | None) -> np.ndarray:
    """``encoder.encode`` in eval mode (a module being trained is put back in train mode after), as
    float32 L2-normalised rows (a zero vector stays zero)."""
    training = getattr(encoder, "training", False)
    if training:
        encoder.eval()
    try:
        emb = encoder.encode(texts) if batch_size is None else encoder.encode(texts, batch_size=batch_size)
    finally:
        if training:
            encoder.train()
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb / np.maximum(norms, 1e-12))


def search(queries: np.ndarray, documents: np.ndarray, depth: int, backend: str = "auto"):
    """Exact top-``depth`` inner-product search: (scores [nq, depth], ids [nq, depth]) best first, ties by
    lower id. ``backend``: "faiss", "numpy" or "auto" (faiss when importable)."""
    depth = min(int(depth), documents.shape[0])
    if depth <= 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    if backend == "auto":
        try:
            import faiss
        except ImportError:
            faiss = None
        backend = "numpy" if faiss is None else "faiss"
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(documents.shape[1])
        index.add(np.ascontiguousarray(documents, dtype=np.float32))
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
    elif backend == "numpy":
        scores_l, ids_l = [], []
        for start in range(0, queries.shape[0], 1024):
            s = queries[start:start + 1024] @ documents.T                              # [b, n]
            if depth < s.shape[1]:
                # the depth-th best score per row; keep all better ones and the lowest ids among the equal
                kth = -np.partition(-s, depth - 1, axis=1)[:, depth - 1:depth]         # [b, 1]
                better = s > kth
                equal = s == kth
                room = depth - better.sum(axis=1, keepdims=True)
                keep = better | (equal & (np.cumsum(equal, axis=1) <= room))          # exactly depth per row
                part = np.argsort(~keep, axis=1, kind="stable")[:, :depth]
            else:
                part = np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
            scores_l.append(np.take_along_axis(s, part, axis=1))
            ids_l.append(part)
        scores, ids = np.concatenate(scores_l), np.concatenate(ids_l)
    else:
        raise ValueError(f"unknown search backend {backend!r}")
    order = np.lexsort((ids, -scores), axis=1)                                          # score desc, id asc
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1).astype(np.int64)


def _corpus(rows: list[dict], extra: Sequence[str] = ()) -> tuple[list[str], dict[str, int]]:
    texts: list[str] = []
    index: dict[str, int] = {}
    for text in [t for r in rows for t in (*r["positives"], *r["neg"])] + list(extra):
        k = doc_key(text)
        if k not in index:
            index[k] = len(texts)
            texts.append(text)
    return texts, index


def _queries(rows: list[dict], index: dict[str, int]) -> tuple[list[str], list[list[int]]]:
    """Distinct query texts (first occurrence order) and each one's relevant corpus ids (in order)."""
    relevant: dict[str, list[int]] = {}
    for r in rows:
        ids = relevant.setdefault(r["query"], [])
        ids.extend(i for i in (index[doc_key(p)] for p in r["positives"]) if i not in ids)
    return list(relevant), list(relevant.values())


def evaluate(encoder, rows: Sequence[dict], k: int = 10, batch_size: int | None = None,
             backend: str = "auto", per_query: bool = False) -> dict:
    """``{"mrr@k", "recall@1", "recall@k", "recall@100", "ndcg@k", "n_queries", "n_documents"}`` (module
    docstring) of ``encoder`` (anything with ``encode(texts) -> [n, dim]``) on pair rows (raw or as
    :func:`embedder.data.pair_row` returns them). With ``per_query``, also ``"rr@k"``: each distinct query's
    reciprocal rank (0 past k), in first-occurrence order, for paired comparisons of two encoders."""
    rows = pair_rows(rows)
    docs, index = _corpus(rows)
    queries, relevant = _queries(rows, index)
    cutoffs = sorted({1, int(k), 100})
    _, ids = search(_encode(encoder, queries, batch_size), _encode(encoder, docs, batch_size), max(cutoffs),
                    backend)
    ndcg = 0.0
    rr: list[float] = []
    recall = dict.fromkeys(cutoffs, 0.0)
    for ranked, rel in zip(ids.tolist(), relevant):
        rel = set(rel)
        hits = [r for r, doc in enumerate(ranked, 1) if doc in rel]                     # 1-based ranks
        first = next((r for r in hits if r <= k), None)
        rr.append(1.0 / first if first else 0.0)
        for c in cutoffs:
            recall[c] += sum(1 for r in hits if r <= c) / len(rel)
        ideal = sum(1.0 / np.log2(r + 1) for r in range(1, min(len(rel), k) + 1))
        ndcg += sum(1.0 / np.log2(r + 1) for r in hits if r <= k) / ideal
    n = len(queries)
    out = {f"mrr@{k}": sum(rr) / n}
    out.update({f"recall@{c}": recall[c] / n for c in cutoffs})
    out[f"ndcg@{k}"] = ndcg / n
    out.update({"n_queries": n, "n_documents": len(docs)})
    if per_query:
        out[f"rr@{k}"] = rr
    return out


def mine_negatives(encoder, rows: Sequence[dict], k: int = 50, corpus: Sequence[str] = (),
                   batch_size: int | None = None, backend: str = "auto") -> list[dict]:
    """The rows (normalised pair rows, in order) with ``neg`` replaced by the ``k`` documents that score
    highest for their query, best first, over the corpus of the rows plus the texts of ``corpus``. A
    query's positives (every row with the same query text contributes its ``pos``; copies by
    :func:`embedder.data.doc_key` are one document) are never mined. Ties follow corpus order, so the result
    is a function of the embeddings."""
    rows = pair_rows(rows)
    docs, index = _corpus(rows, corpus)
    queries, relevant = _queries(rows, index)
    depth = int(k) + max((len(r) for r in relevant), default=0)
    _, ids = search(_encode(encoder, queries, batch_size), _encode(encoder, docs, batch_size), depth, backend)
    mined = {}
    for query, ranked, rel in zip(queries, ids.tolist(), relevant):
        rel = set(rel)
        mined[query] = [docs[i] for i in ranked if i not in rel][:int(k)]
    return [{**r, "neg": list(mined[r["query"]])} for r in rows]
