"""Faiss helpers of the index stages: check and choose index strings, train, add codes, tune search.

Everything that touches faiss objects lives here, so the stages stay about blocks and files. Faiss is
imported lazily (``import retro_pipeline`` never loads it).

Adding: workers encode vectors with ``sa_encode`` (the standalone codes of the whole index, list numbers
included for IVF) and :func:`add_codes` appends them with ids = train-DB rows. Faiss implements
``add_sa_codes`` for flat-code and IVF indexes; for an OPQ/PCA pre-transform the codes go to the inner index,
and for fast-scan indexes (``PQ…x4fs``) they go to a plain PQ twin that is then packed into the fast-scan
layout, exactly as ``index.add`` would have laid them out (tested: byte-identical to a serial add).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Any

import numpy as np

from retro_pipeline.errors import RetroError

MIN_PER_LIST = 39  # faiss k-means warns under 39 training points per centroid


def faiss():
    from retro_pipeline.errors import require

    return require("faiss", "cpu")


def threads() -> int:
    """CPUs of this worker: Ray sets OMP_NUM_THREADS to a task's or actor's CPUs; else every CPU here."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))


@contextlib.contextmanager
def quiet_native_output():
    """Silence faiss's own prints to stdout/stderr (k-means warnings, verbose lines); we say what matters."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


# ---------------------------------------------------------------------- index strings


def parts(index) -> list:
    """The index and its inner indexes (pre-transform → index; IVF → its quantizer), downcast; of a
    :class:`ShardedIndex`, those of every shard."""
    if isinstance(index, ShardedIndex):
        return [p for shard in index.shards for p in parts(shard)]
    f = faiss()
    out = []
    idx = f.downcast_index(index)
    while True:
        out.append(idx)
        if isinstance(idx, f.IndexPreTransform):
            idx = f.downcast_index(idx.index)
        elif isinstance(idx, f.IndexIVF):
            out.append(f.downcast_index(idx.quantizer))
            return out
        else:
            return out


def ivf_of(index):
    f = faiss()
    for p in parts(index):
        if isinstance(p, f.IndexIVF):
            return p
    return None


def check_index_str(index_str: str, dim: int):
    """An untrained index for ``index_str``, or a one-line error when faiss rejects it or the pipeline
    cannot add codes to it."""
    f = faiss()
    try:
        with quiet_native_output():
            index = f.index_factory(dim, index_str)
    except RuntimeError as e:
        raise RetroError(f"--index-str {index_str!r}: faiss rejects it for {dim}-dimensional embeddings "
                         f"({_faiss_message(e)}); give a faiss.index_factory string such as 'Flat', "
                         f"'IVF1024,Flat' or 'IVF4096,PQ32', or 'auto'") from None
    inner = parts(index)
    top = inner[1] if isinstance(inner[0], f.IndexPreTransform) else inner[0]
    if not isinstance(top, (f.IndexIVF, f.IndexFlatCodes, f.IndexPQFastScan)):
        raise RetroError(f"--index-str {index_str!r}: a {type(top).__name__} cannot take precomputed codes, which "
                         f"the parallel add needs; use an IVF index (an HNSW quantizer is fine: 'IVF4096_HNSW32,"
                         f"Flat'), or a flat-code one (Flat, SQ8, PQ32, PQ32x4fs)")
    return index


def _faiss_message(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"(?:Error: )?'[^']*' failed: (.*)", text) or re.search(r"Error in .*? at \S+:\d+: (.*)", text)
    if m:  # faiss's own words, without its C++ signature and source position
        return m.group(1).strip().splitlines()[0]
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Error in", "faiss::")):
            return line.split(" at /")[0]
    return text.splitlines()[0].split(" at /")[0] if text else type(e).__name__


def code_size(index_str: str, dim: int) -> int:
    return int(check_index_str(index_str, dim).sa_code_size())


def auto_index_str(n_chunks: int, dim: int, memory: int) -> str:
    """The most accurate index whose codes (plus ids) for ``n_chunks`` fit ``memory`` bytes: full vectors,
    then SQ8, then PQ with fewer bytes; with IVF lists (4..16·sqrt(N), an HNSW quantizer past 1M chunks)
    once the DB is too large to search exhaustively."""
    from retro_pipeline import sizing

    nlist = sizing.auto_nlist(n_chunks)
    if nlist == 0:
        prefix = ""
    elif nlist < 65536:
        prefix = f"IVF{nlist},"
    else:
        prefix = f"IVF{nlist}_HNSW32,"
    codes = ["Flat", "SQ8"] + [f"PQ{m}" for m in (dim // 2, dim // 4, dim // 8, dim // 16)
                               if m >= 4 and dim % m == 0]
    per_id = 8 if prefix else 0
    for c in dict.fromkeys(codes):
        need = n_chunks * (code_size(prefix + c, dim) + per_id)
        if need <= memory:
            return prefix + c
    smallest = n_chunks * (code_size(prefix + codes[-1], dim) + per_id)
    raise RetroError(f"--index-memory {memory}: too small for any index of {n_chunks} {dim}-dimensional chunks "
                     f"(the smallest, {prefix + codes[-1]}, needs {smallest} bytes); raise --index-memory")


def parse_memory(value) -> str:
    """``auto`` or a byte count, with an optional K/M/G/T suffix (powers of 1024), as a canonical string."""
    text = str(value).strip()
    if text == "auto":
        return text
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise RetroError(f"--index-memory {value!r}: give a number of bytes (e.g. 64G, 500M) or 'auto'")
    return str(int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")))


def memory_budget(value: str) -> int:
    if value != "auto":
        return int(value)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)


# ---------------------------------------------------------------------- training


def check_training_size(index, n: int, log=None) -> None:
    """Raise where ``n`` training vectors cannot train ``index`` (fewer than its IVF lists, or than a product
    quantizer's codebook entries); warn (with ``log``) where k-means gets fewer than it wants."""
    ivf = ivf_of(index)
    if ivf is not None:
        if n < ivf.nlist:
            raise RetroError(f"index-train: {n} training vectors for {ivf.nlist} IVF lists; faiss needs at least "
                             f"one per list and {MIN_PER_LIST * ivf.nlist} ({MIN_PER_LIST} per list) to train well: "
                             f"use fewer lists in --index-str, or more with db-build --index-ntrain (or a larger "
                             f"corpus)")
        if n < MIN_PER_LIST * ivf.nlist and log is not None:
            log.warning("index-train: %d training vectors for %d IVF lists, fewer than the %d (%d per list) that "
                        "k-means wants; the lists will be uneven (use fewer lists or more --index-ntrain)",
                        n, ivf.nlist, MIN_PER_LIST * ivf.nlist, MIN_PER_LIST)
    for p in parts(index):
        pq = getattr(p, "pq", None)
        if pq is not None and n < pq.ksub:
            raise RetroError(f"index-train: {n} training vectors for product-quantizer codebooks of {pq.ksub} "
                             f"entries; faiss needs at least {pq.ksub}: use more with db-build --index-ntrain, "
                             f"or fewer bits per code in --index-str")


def train(index_str: str, x: np.ndarray, log) -> Any:
    """Train an empty index on ``x`` (float32 [n, d]) with this worker's threads; faiss's GPUs for IVF
    k-means where faiss has GPUs. Checks the training-set size first."""
    f = faiss()
    n, dim = x.shape
    index = check_index_str(index_str, dim)
    ivf = ivf_of(index)
    check_training_size(index, n, log)
    for p in parts(index):
        if isinstance(p, f.IndexIVFPQ):
            p.do_polysemous_training = False  # search never uses it, and it costs ~40 s fixed
    if ivf is not None and f.get_num_gpus() > 0:
        ivf.clustering_index = f.index_cpu_to_all_gpus(f.IndexFlat(ivf.d, ivf.metric_type))
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        with quiet_native_output():
            top = f.downcast_index(index)
            if isinstance(top, f.IndexPreTransform):
                # OPQ/PCA training (BLAS products, an SVD) gives other bits with other thread counts: it runs
                # on one thread, so the trained index is the same on every worker shape (k-means and PQ
                # training are exact across thread counts: tested)
                f.omp_set_num_threads(1)
                for i in range(top.chain.size()):
                    vt = top.chain.at(i)
                    vt.train(x)
                    x = vt.apply(x)
                f.omp_set_num_threads(threads())
                f.downcast_index(top.index).train(x)
                top.is_trained = True
            else:
                f.omp_set_num_threads(threads())
                index.train(x)
    except RuntimeError as e:
        raise RetroError(f"index-train: faiss could not train {index_str!r} on {n} vectors "
                         f"({_faiss_message(e)}); change --index-str or --index-ntrain") from None
    if ivf is not None:
        ivf.clustering_index = None
    return index


def write_index(index, path) -> None:
    from retro_pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        faiss().write_index(index, str(tmp))


def read_index(path, what: str = "index", mmap: bool = False):
    f = faiss()
    if not os.path.exists(path):
        raise RetroError(f"{path}: the {what} is missing; run index-train (or index-build) first")
    try:
        index = f.read_index(str(path), f.IO_FLAG_MMAP | f.IO_FLAG_READ_ONLY if mmap else 0)
        if mmap and lists_on_disk(index):   # lists in their own file already: that flag breaks their search
            index = f.read_index(str(path), 0)   # (faiss 1.15 crashes); they are memory-mapped as they are
        return index
    except RuntimeError as e:
        raise RetroError(f"{path}: not a readable faiss index ({_faiss_message(e)}); rebuild it with "
                         f"'retro-pipeline index-build --force'") from None


# ---------------------------------------------------------------------- adding


def add_codes(index, codes: np.ndarray, ids: np.ndarray):
    """Append ``codes`` (from ``index.sa_encode``) with ``ids``; returns the index holding them (the same
    object, or a new one for fast-scan indexes, which are repacked)."""
    f = faiss()
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    idx = f.downcast_index(index)
    if isinstance(idx, f.IndexPreTransform):
        inner = f.downcast_index(idx.index)
        new = add_codes(inner, codes, ids)
        if new is not inner:  # hand the repacked inner index over to the pre-transform
            new.this.disown()
            idx.index = new
            idx.own_fields = True
        idx.ntotal = f.downcast_index(idx.index).ntotal
        return index
    if isinstance(idx, f.IndexIVFPQFastScan):
        twin = f.IndexIVFPQ(idx.quantizer, idx.d, idx.nlist, idx.pq.M, idx.pq.nbits, idx.metric_type)
        twin.pq = idx.pq
        twin.by_residual = idx.by_residual
        twin.is_trained = True
        _add_existing(twin, idx)
        twin.add_sa_codes(codes, ids)
        out = f.IndexIVFPQFastScan(twin, idx.bbs)
        quantizer = f.clone_index(idx.quantizer)
        quantizer.this.disown()
        out.quantizer = quantizer
        out.own_fields = True
        out.nprobe = idx.nprobe
        return out
    if isinstance(idx, f.IndexPQFastScan):
        twin = f.IndexPQ(idx.d, idx.pq.M, idx.pq.nbits, idx.metric_type)
        twin.pq = idx.pq
        twin.is_trained = True
        _add_existing(twin, idx)
        twin.add_sa_codes(codes, ids)
        return f.IndexPQFastScan(twin, idx.bbs)
    idx.add_sa_codes(codes, ids)
    return index


def _add_existing(twin, fast) -> None:
    """Fast-scan indexes are built in one go: only an empty one can be repacked with new codes."""
    if fast.ntotal:
        raise RuntimeError("fast-scan codes are added in one call (add_codes_all)")


def add_codes_all(index, blocks):
    """Add every ``(codes, ids)`` of ``blocks`` in order. Fast-scan indexes get them in one repacking."""
    if is_fast_scan(index):
        blocks = list(blocks)
        if not blocks:
            return index
        codes, ids = zip(*blocks)
        return add_codes(index, np.concatenate(codes), np.concatenate(ids))
    for codes, ids in blocks:
        index = add_codes(index, codes, ids)
    return index


def is_fast_scan(index) -> bool:
    f = faiss()
    return any(isinstance(p, (f.IndexIVFPQFastScan, f.IndexPQFastScan)) for p in parts(index))


def add_codes_on_disk(index, blocks, lists_dir, scratch) -> Any:
    """Like :func:`add_codes_all`, but the IVF lists end in ``lists_dir/lists.ivfdata``
    (``OnDiskInvertedLists``, memory-mapped when read) instead of memory: each block becomes a one-block
    index file in ``scratch``, and faiss merges their lists into the on-disk file list by list, in block
    order, so ids and search results equal an in-memory add. ``lists_dir`` is written as a temporary
    directory renamed into place (a kill never leaves half a list file)."""
    from faiss.contrib.ondisk import merge_ondisk

    from retro_pipeline.io import atomic_dir

    f = faiss()
    shards = []
    for i, (codes, ids) in enumerate(blocks):
        shard = add_codes(f.clone_index(index), codes, ids)
        path = os.path.join(scratch, f"block{i:06d}.faissindex")
        f.write_index(shard, path)
        shards.append(path)
        del shard
    final = os.path.join(os.path.abspath(lists_dir), "lists.ivfdata")
    with atomic_dir(lists_dir) as tmp:
        with quiet_native_output():
            merge_ondisk(index, shards, os.path.join(tmp, "lists.ivfdata"))
        lists = f.downcast_InvertedLists(f.extract_index_ivf(index).invlists)
        lists.filename = final  # where the file is once the directory is renamed into place
    return index


# ---------------------------------------------------------------------- shards and searching


class ShardedIndex:
    """An index cut into shards by row: each shard holds the codes of a contiguous range of train-DB rows (ids
    stay train-DB rows), and every shard is the same trained index (quantizer, codebooks, transforms).
    :meth:`search` searches each and merges their top-k (:func:`merge_results`). With a shared coarse quantizer
    every shard probes the lists the whole index would, with the same codes in them, so the merged result is
    the whole index's search. An index without ids of its own (Flat, SQ, PQ: not IVF) numbers a shard's rows
    from 0: ``first_rows`` (each shard's first train-DB row) turns those numbers into rows."""

    def __init__(self, shards: list, first_rows: list[int] | None = None):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards = shards
        self.offsets = [row_offset(s, r) for s, r in zip(shards, first_rows or [0] * len(shards))]
        self.d = shards[0].d
        self.metric_type = shards[0].metric_type

    @property
    def ntotal(self) -> int:
        return sum(int(s.ntotal) for s in self.shards)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if preassignable(self.shards[0]):   # the shards share their quantizer: assign the lists once for all
            xt, Dq, Iq = coarse_assign(self.shards[0], x)
            found = [search_preassigned(shard, xt, k, Iq, Dq) for shard in self.shards]
        else:
            found = [shard.search(x, k) for shard in self.shards]
        return merge_results([d for d, _ in found], [with_offset(i, o) for (_, i), o in zip(found, self.offsets)],
                             k, self.metric_type)


def row_offset(shard, first_row: int) -> int:
    """What to add to a shard's result ids to make them train-DB rows: 0 where the index stores the ids it was
    given (IVF), ``first_row`` where it numbers its vectors from 0."""
    return 0 if ivf_of(shard) is not None else int(first_row)


def with_offset(ids: np.ndarray, offset: int) -> np.ndarray:
    return np.where(ids >= 0, ids + offset, ids) if offset else ids


class ShardSearcher:
    """One shard of a sharded index, loaded into memory once and searched with the tuned settings: a service of
    query-neighbors (one actor per shard, :meth:`retro_pipeline.stage.Stage.services`)."""

    def __init__(self, path: str, params: dict[str, int], first_row: int = 0, threads: int = 1):
        faiss().omp_set_num_threads(threads)
        self.index = read_index(path, "index shard")
        self.offset = row_offset(self.index, first_row)
        set_search_params(self.index, params)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.index.search(np.ascontiguousarray(x, dtype=np.float32), k)
        return D, with_offset(I, self.offset)

    def search_preassigned(self, xt: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray):
        """The search of queries already through the transforms and assigned to lists (:func:`coarse_assign`
        on the trained index every shard was made from)."""
        D, I = search_preassigned(self.index, xt, k, Iq, Dq)
        return D, with_offset(I, self.offset)


class RemoteShards(ShardedIndex):
    """A :class:`ShardedIndex` whose shards are searched by :class:`ShardSearcher` services: a search sends the
    queries once to every shard's service and merges what comes back."""

    def __init__(self, handles: list, d: int, ntotal: int, metric_type: int, trained=None):
        self.handles, self.d, self._ntotal, self.metric_type = list(handles), int(d), int(ntotal), int(metric_type)
        self.shards = []
        # the trained (empty) index every shard was made from, with the search settings: with it, a search
        # assigns the queries to lists once here instead of once in every shard
        self.trained = trained if trained is not None and preassignable(trained) else None

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import ray

        if self.trained is not None:
            xt, Dq, Iq = coarse_assign(self.trained, x)
            refs = [ray.put(a) for a in (xt, Iq, Dq)]
            found = ray.get([h.call.remote("search_preassigned", refs[0], k, refs[1], refs[2]) for h in self.handles])
        else:
            ref = ray.put(np.ascontiguousarray(x, dtype=np.float32))
            found = ray.get([h.call.remote("search", ref, k) for h in self.handles])
        return merge_results([d for d, _ in found], [i for _, i in found], k, self.metric_type)


def merge_results(dists: list[np.ndarray], ids: list[np.ndarray], k: int, metric_type: int):
    """The top ``k`` of several searches of the same queries ([n, k_i] distances and ids each): best first, ties
    by id, missing (-1) last."""
    f = faiss()
    D, I = np.concatenate(dists, axis=1), np.concatenate(ids, axis=1).astype(np.int64)
    higher_better = metric_type == f.METRIC_INNER_PRODUCT
    key = np.where(I < 0, np.inf, -D if higher_better else D).astype(np.float64)
    order = np.lexsort((np.where(I < 0, np.iinfo(np.int64).max, I), key), axis=1)[:, :k]
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if D.shape[1] < k:  # fewer candidates than k in all: pad as faiss does
        pad = k - D.shape[1]
        D = np.concatenate([D, np.full((len(D), pad), -np.finfo(np.float32).max if higher_better else
                                       np.finfo(np.float32).max, dtype=D.dtype)], axis=1)
        I = np.concatenate([I, np.full((len(I), pad), -1, dtype=np.int64)], axis=1)
    return D, I


def search(index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with ties in distance ordered by id (a whole index and a sharded one give the same
    rows; faiss leaves the order of ties to its heap). An index whose lists are on disk is searched list by
    list (:func:`search_by_list`)."""
    if isinstance(index, ShardedIndex):
        return index.search(x, k)
    if lists_on_disk(index):
        return search_by_list(index, x, k)
    D, I = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    return merge_results([D], [I], k, index.metric_type)


def lists_on_disk(index) -> bool:
    """Whether an IVF index's lists are in a file of their own (``OnDiskInvertedLists`` with a file name; a
    memory-mapped read of an in-memory index maps its lists from the index file, with no name)."""
    f = faiss()
    ivf = ivf_of(index)
    if ivf is None:
        return False
    lists = f.downcast_InvertedLists(ivf.invlists)
    return isinstance(lists, f.OnDiskInvertedLists) and bool(lists.filename)


def coarse_assign(index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What an IVF index's search does before it scans lists: ``x`` through the index's transforms (OPQ, PCA),
    and the ``nprobe`` nearest lists of each (distances ``Dq``, lists ``Iq``), with the search settings set on it.
    ``ivf_of(index).search_preassigned(x, k, Iq, Dq)`` then searches as ``index.search(x, k)`` does."""
    f = faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    ivf = ivf_of(index)
    if isinstance(index, f.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    Dq, Iq = ivf.quantizer.search(x, min(ivf.nprobe, ivf.nlist))
    return x, Dq, Iq


_pool = None   # threads for search_preassigned (faiss releases the GIL while it searches)


def search_preassigned(index, x: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``search_preassigned`` of the IVF part of ``index`` on every thread faiss may use: called from Python it
    runs on one (faiss 1.15), so the queries are cut into one slice a thread, searched side by side."""
    global _pool
    ivf = ivf_of(index)
    n, nt = len(x), faiss().omp_get_max_threads()
    if nt <= 1 or n < 2 * nt:
        return ivf.search_preassigned(x, k, Iq, Dq)
    if _pool is None or _pool._max_workers < nt:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(nt, thread_name_prefix="faiss-search")
    cuts = np.linspace(0, n, nt + 1).astype(int)
    parts = list(_pool.map(lambda ab: ivf.search_preassigned(x[ab[0]:ab[1]], k, Iq[ab[0]:ab[1]], Dq[ab[0]:ab[1]]),
                           zip(cuts[:-1], cuts[1:])))
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def preassignable(index) -> bool:
    """An IVF index whose search can be split into :func:`coarse_assign` and ``search_preassigned`` (fast-scan
    IVF indexes search lists their own way)."""
    return ivf_of(index) is not None and not is_fast_scan(index)


def search_by_list(index, x: np.ndarray, k: int, group_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """The search of an IVF index done by inverted list rather than by query, as faiss's ``big_batch_search``
    does, for lists on disk: the queries' lists (the coarse search, once) are taken in list order, which is
    their order on disk, a group of about ``group_bytes`` at a time; each group is searched for the queries
    that probe it (``search_preassigned`` with the other lists masked) and merged into the running top-k. So a
    batch reads each list once, in file order, and holds one group's pages at a time, where a search by query
    reads a query's lists in random order, again for every query that probes them. Distances are computed by
    the same code on the same codes: the result equals ``index.search``'s (ties by id, :func:`merge_results`)."""
    f = faiss()
    ivf = ivf_of(index)
    x, Dq, Iq = coarse_assign(index, x)
    higher_better = index.metric_type == f.METRIC_INNER_PRODUCT
    D = np.full((len(x), k), -np.finfo(np.float32).max if higher_better else np.finfo(np.float32).max, np.float32)
    I = np.full((len(x), k), -1, np.int64)
    probed = np.unique(Iq[Iq >= 0])
    sizes = np.fromiter((ivf.invlists.list_size(int(lst)) for lst in probed), np.int64, len(probed))
    sizes *= ivf.code_size + 8
    first, held = 0, 0
    for j in range(len(probed) + 1):
        if j < len(probed) and (held == 0 or held + sizes[j] <= group_bytes):
            held += int(sizes[j])
            continue
        if j > first:
            mask = (Iq >= probed[first]) & (Iq <= probed[j - 1])
            rows = np.flatnonzero(mask.any(axis=1))
            Dg, Ig = search_preassigned(index, x[rows], k, np.where(mask[rows], Iq[rows], -1), Dq[rows])
            D[rows], I[rows] = merge_results([D[rows], Dg], [I[rows], Ig], k, index.metric_type)
        first, held = j, int(sizes[j]) if j < len(probed) else 0
    return D, I


def shard_bounds(row_ranges: list[tuple[int, int]], n_shards: int) -> list[tuple[int, int]]:
    """Consecutive block ranges ``[(start, end), ...]`` grouped into at most ``n_shards`` contiguous groups
    of about equal rows; returns each group's (first block index, end block index)."""
    total = sum(e - s for s, e in row_ranges)
    groups, first, done = [], 0, 0
    for i, (s, e) in enumerate(row_ranges):
        done += e - s
        target = total * (len(groups) + 1) / n_shards
        if done >= target and len(groups) < n_shards - 1:
            groups.append((first, i + 1))
            first = i + 1
    if first < len(row_ranges):
        groups.append((first, len(row_ranges)))
    return groups


# ---------------------------------------------------------------------- search parameters and recall


def search_grid(index) -> list[dict[str, int]]:
    """Candidate search settings, cheapest first: nprobe only with IVF, efSearch only with HNSW."""
    f = faiss()
    ivf = ivf_of(index)
    hnsw = [p for p in parts(index) if isinstance(p, f.IndexHNSW)]
    if ivf is None:
        if hnsw:
            return [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512)]
        return [{}]
    nprobes = sorted({min(ivf.nlist, 1 << i) for i in range(0, int(math.log2(ivf.nlist)) + 2)})
    grid = []
    for nprobe in nprobes:
        if hnsw:
            for ef in sorted({max(16, nprobe), max(16, 2 * nprobe), max(16, 4 * nprobe)}):
                grid.append({"nprobe": nprobe, "efSearch": ef})
        else:
            grid.append({"nprobe": nprobe})
    return grid


def set_search_params(index, params: dict[str, int]) -> None:
    f = faiss()
    for p in parts(index):
        if "nprobe" in params and isinstance(p, f.IndexIVF):
            p.nprobe = int(params["nprobe"])
        if "efSearch" in params and isinstance(p, f.IndexHNSW):
            p.hnsw.efSearch = int(params["efSearch"])


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k ∩ true top-k| / k (ids; -1 never counts)."""
    hits = 0
    for f_row, t_row in zip(found[:, :k], truth[:, :k]):
        hits += len(np.intersect1d(f_row[f_row >= 0], t_row[t_row >= 0]))
    return hits / (k * len(truth)) if len(truth) else 1.0


def tune(index, queries: np.ndarray, truth: np.ndarray, k: int, target: float, given: dict[str, int], log):
    """Measure recall@10 and recall@k over the grid; choose the cheapest setting reaching ``target`` on
    recall@10 (or, where no setting does, the cheapest within 0.01 of the best). ``given`` fixes settings."""
    f = faiss()
    f.omp_set_num_threads(threads())
    k = min(k, truth.shape[1])
    k10 = min(10, k)
    grid = [p for p in search_grid(index) if all(p.get(key, v) == v for key, v in given.items())]
    if not grid:
        grid = [dict(given)]
    table = []
    best = -1.0
    for params in grid:
        set_search_params(index, params)
        t0 = time.perf_counter()
        _, found = search(index, queries, k)
        secs = time.perf_counter() - t0
        row = {**params, "recall@10": round(recall(found, truth, k10), 6), f"recall@{k}": round(recall(found, truth, k), 6),
               "queries_per_second": round(len(queries) / max(secs, 1e-9), 1)}
        table.append(row)
        best = max(best, row["recall@10"])
        if row["recall@10"] >= 0.9999:
            break  # nothing dearer can do better
        if len(table) >= 3 and table[-1]["recall@10"] - table[-3]["recall@10"] < 0.001 and \
                table[-1].get("nprobe") != table[-2].get("nprobe") != table[-3].get("nprobe"):
            break  # the codes, not the search, limit recall now
    reach = [r for r in table if r["recall@10"] >= target]
    if reach:
        chosen = reach[0]
    else:
        chosen = next(r for r in table if r["recall@10"] >= best - 0.01)
        log.warning("index-add: no search setting of this index reaches recall@10 %.3f (the best: %.3f); using "
                    "the cheapest within 0.01 of the best (%s); for more, use larger codes in --index-str",
                    target, best, _show(chosen))
    params = {key: chosen[key] for key in ("nprobe", "efSearch") if key in chosen}
    set_search_params(index, params)
    return params, chosen, table


def _show(row) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.items() if k in ("nprobe", "efSearch", "recall@10")) or "no parameters"
