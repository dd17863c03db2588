"""Index build throughput: the pipeline's faiss path against plain faiss on the same vectors, in one process.

Vectors: a seeded mixture of Gaussian clusters (``--n`` base vectors, ``--dim`` dimensions, unit norm, like
sentence embeddings), so that IVF lists are uneven as on real text. For each index string:

- train: ``retro_pipeline.faiss_index.train`` (polysemous training off, OPQ on one thread) against plain
  ``index.train`` with faiss's defaults, same training vectors;
- add: the pipeline's way, blocks of ``--block`` vectors ``sa_encode``d, written to HDF5 code files, read
  back and added in row order (``add_codes_all``), against one plain ``index.add`` of all vectors. The two
  indexes are checked to be byte-identical;
- search: queries/s at the setting ``tune`` chose (cheapest reaching recall@10 0.95 against exact search of
  ``--queries`` held-out vectors), the same for both (it is one faiss search), and the recall table.

Reported: median seconds over ``--repeats`` rounds and the ratios (pipeline / plain, as throughput).

    python benchmarks/bench_index.py                    # 200k x 384, IVF1024,Flat and IVF1024,PQ48
    python benchmarks/bench_index.py --n 50000 --index-str IVF256,Flat --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import faiss
import h5py
import numpy as np

from retro_pipeline import faiss_index
from retro_pipeline.io import atomic_path, h5_create, h5_open_write


class _Log:
    def warning(self, msg, *args):
        print("warning:", msg % args)


def vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, n // 500), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pipeline_add(empty, x: np.ndarray, block: int, tmp: str, phases: dict):
    """Workers' side (sa_encode + write each block) then the merge (read + add in row order)."""
    t0 = time.perf_counter()
    paths = []
    for s in range(0, len(x), block):
        codes = empty.sa_encode(x[s:s + block])
        path = os.path.join(tmp, f"{s}.hdf5")
        with atomic_path(path) as t:
            with h5_open_write(t) as f:
                h5_create(f, "data", data=codes)
        paths.append((s, path))
    t1 = time.perf_counter()

    def blocks():
        for s, path in paths:
            with h5py.File(path, "r") as f:
                codes = f["data"][...]
            yield codes, np.arange(s, s + len(codes), dtype=np.int64)

    out = faiss_index.add_codes_all(faiss.clone_index(empty), blocks())
    phases.setdefault("encode", []).append(t1 - t0)
    phases.setdefault("merge", []).append(time.perf_counter() - t1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ntrain", type=int, default=65_536)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--block", type=int, default=20_000)
    ap.add_argument("--index-str", action="append", help="repeatable [default: IVF1024,Flat and IVF1024,PQ48]")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    x = vectors(args.n + args.queries, args.dim)
    xb, xq = x[:args.n], x[args.n:]
    xt = xb[np.random.default_rng(1).choice(args.n, min(args.ntrain, args.n), replace=False)]
    print(f"{args.n} x {args.dim} vectors, {len(xt)} training, {args.queries} queries, faiss {faiss.__version__}, "
          f"{faiss_index.threads()} threads")
    _, truth = faiss.knn(xq, xb, 20)
    for index_str in args.index_str or ["IVF1024,Flat", "IVF1024,PQ48"]:
        t_ours, t_plain, a_ours, a_plain, phases = [], [], [], [], {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            empty = faiss_index.train(index_str, xt, _Log())
            t_ours.append(time.perf_counter() - t0)
            plain_empty = faiss.index_factory(args.dim, index_str)
            t0 = time.perf_counter()
            plain_empty.train(xt)
            t_plain.append(time.perf_counter() - t0)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                ours = pipeline_add(empty, xb, args.block, tmp, phases)
                a_ours.append(time.perf_counter() - t0)
            plain = faiss.clone_index(empty)
            t0 = time.perf_counter()
            plain.add(xb)
            a_plain.append(time.perf_counter() - t0)
            assert faiss.serialize_index(ours).tobytes() == faiss.serialize_index(plain).tobytes()
        params, chosen, table = faiss_index.tune(ours, xq, truth, 20, 0.95, {}, _Log())
        faiss_index.set_search_params(plain, params)
        qps = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain.search(xq, 20)
            qps.append(len(xq) / (time.perf_counter() - t0))
        m = statistics.median
        print(f"\n{index_str}")
        print(f"  train  pipeline {m(t_ours):7.2f} s   plain faiss {m(t_plain):7.2f} s   "
              f"speed ratio {m(t_plain) / m(t_ours):.2f}x")
        print(f"  add    pipeline {args.n / m(a_ours):9.0f} vec/s   plain faiss {args.n / m(a_plain):9.0f} vec/s   "
              f"ratio {m(a_plain) / m(a_ours):.2f}x (byte-identical indexes)")
        print(f"         of which encode + write blocks (parallel over workers in a build) {m(phases['encode']):.2f} s, "
              f"merge (one job) {m(phases['merge']):.2f} s; plain add {m(a_plain):.2f} s")
        print(f"  search {params or 'no parameters'}: pipeline {chosen['queries_per_second']:.0f} q/s, plain faiss "
              f"{m(qps):.0f} q/s at the same setting; recall@10 {chosen['recall@10']:.3f}")
        for row in table:
            print("    " + "  ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
