"""Query throughput of a sharded index against the one index it was cut from, in one run.

The same trained IVF-PQ index (faiss ``index_factory``), with the same codes: once whole, once cut into S
shards of contiguous rows (``retro_pipeline.faiss_index``, as ``index-add --index-shards`` cuts it). Queries
are searched in blocks (as query-neighbors searches a block's chunks) three ways:

- ``whole``: the one index (faiss on every CPU);
- ``sharded``: :class:`ShardedIndex` in this process, every shard searched in turn and the top-k merged;
- ``services``: :class:`RemoteShards`, one Ray actor per shard (what a Ray build runs), the block sent once
  to every shard and the answers merged.

Every way must return the whole index's ids (checked); printed: queries/s (median of ``--repeats``) and the
ratio to ``whole``.

    python benchmarks/bench_shards.py                 # 200k vectors of 384 dims, IVF1024,PQ32, 4 shards
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def clustered(n: int, d: int, centers: int, rng) -> np.ndarray:
    """Vectors around ``centers`` random directions (an embedding-like, clustered set), unit length."""
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--index-str", default="IVF1024,PQ32")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--block", type=int, default=1024, help="queries per search call (a block's chunks)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import faiss

    from retro_pipeline import faiss_index
    from retro_pipeline.executor.ray import _ServiceHost

    rng = np.random.default_rng(0)
    x = clustered(args.n + args.queries, args.dim, 2000, rng)
    base, q = x[:args.n], x[args.n:]
    t = time.perf_counter()
    empty = faiss.index_factory(args.dim, args.index_str, faiss.METRIC_INNER_PRODUCT)
    empty.train(base[:min(args.n, 50_000)])
    print(f"machine: {os.cpu_count()} CPUs; {args.n:,} x {args.dim} vectors, {args.index_str}, trained in "
          f"{time.perf_counter() - t:.1f} s; {args.queries:,} queries in blocks of {args.block}, k={args.k}, "
          f"nprobe={args.nprobe}, {args.shards} shards")
    ids = np.arange(args.n, dtype=np.int64)
    whole = faiss_index.add_codes(faiss.clone_index(empty), empty.sa_encode(base), ids)
    bounds = np.linspace(0, args.n, args.shards + 1).astype(int)
    shards = [faiss_index.add_codes(faiss.clone_index(empty), empty.sa_encode(base[s:e]), ids[s:e])
              for s, e in zip(bounds[:-1], bounds[1:])]
    for index in (whole, *shards):
        faiss_index.set_search_params(index, {"nprobe": args.nprobe})
    sharded = faiss_index.ShardedIndex(shards)

    import tempfile

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="error")
    scratch = tempfile.mkdtemp()
    handles = []
    for i, shard in enumerate(shards):
        path = os.path.join(scratch, f"shard{i}.faissindex")
        faiss.write_index(shard, path)
        handles.append(ray.remote(_ServiceHost).options(num_cpus=0).remote(   # as the Ray executor serves it
            faiss_index.ShardSearcher, path, {"nprobe": args.nprobe}, int(bounds[i]),
            max(1, (os.cpu_count() or 1) // args.shards)))
    trained = faiss.clone_index(empty)   # as query-neighbors' workers hold it: the lists are assigned there once
    faiss_index.set_search_params(trained, {"nprobe": args.nprobe})
    remote = faiss_index.RemoteShards(handles, args.dim, args.n, whole.metric_type, trained)

    def run(index) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        found = [faiss_index.search(index, q[s:s + args.block], args.k)[1] for s in range(0, len(q), args.block)]
        return time.perf_counter() - t0, np.concatenate(found)

    want = run(whole)[1]
    rates: dict[str, list[float]] = {"whole": [], "sharded": [], "services": []}
    for _ in range(args.repeats):   # interleaved, so that drift on a shared machine hits all three alike
        for name, index in (("whole", whole), ("sharded", sharded), ("services", remote)):
            secs, found = run(index)
            assert np.array_equal(found, want), f"{name}: other ids than the whole index's"
            rates[name].append(len(q) / secs)
    base_rate = statistics.median(rates["whole"])
    for name, r in rates.items():
        print(f"{name:>9}: {statistics.median(r):>9,.0f} queries/s (runs {', '.join(f'{v:,.0f}' for v in r)}), "
              f"{statistics.median(r) / base_rate:.2f}x whole")
    ray.shutdown()


if __name__ == "__main__":
    main()
