"""Searching an index whose IVF lists are on disk: by query (faiss's ``search``) against by inverted list
(``retro_pipeline.faiss_index.search_by_list``, what query-neighbors runs on such an index), in one run.

One trained IVF index, its lists written to ``lists.ivfdata`` as index-add writes them past --index-memory
(``faiss_index.add_codes_on_disk``) and read back memory-mapped. Queries are searched in blocks (as
query-neighbors searches a block's chunks), each way from a cold page cache: before every run the list file's
pages are dropped (``posix_fadvise(DONTNEED)``, the file is not mapped then). Printed per way (median of
``--repeats``): queries/s, bytes read from storage (``/proc/self/io`` read_bytes), the ratio to the size of
the lists the queries probe, and the ratios of by-list to by-query. Both ways must return the same ids and
distances (checked).

    python benchmarks/bench_ondisk.py                   # 400k vectors of 128 dims, IVF1024,Flat
    python benchmarks/bench_ondisk.py --cache-mb 64 --group-mb 16    # a node that cannot cache the lists
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class MemoryCgroup:
    """This process moved into a cgroup-v1 memory group limited to ``limit`` bytes while in the ``with``
    (what it allocated before stays charged where it was: the limit holds the page cache it reads from then
    on), and moved back and removed after."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit: int):
        self.limit, self.path = limit, self.ROOT / f"bench-ondisk-{os.getpid()}"

    def __enter__(self):
        own = next(line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup") if ":memory:" in line)
        self.parent = self.ROOT / own.lstrip("/")
        self.path = self.parent / self.path.name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        (self.parent / "cgroup.procs").write_text(str(os.getpid()))
        self.path.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--index-str", default="IVF1024,Flat")
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--block", type=int, default=1024, help="queries per search call (a block's chunks)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-mb", type=int, default=256, help="search_by_list's group of lists (MiB)")
    ap.add_argument("--cache-mb", type=int, default=0,
                    help="searches run in a memory cgroup (v1, as root) that holds this much page cache, less "
                         "than the lists: a node whose index does not fit its memory (0: no limit)")
    args = ap.parse_args()

    import faiss

    from bench_shards import clustered
    from retro_pipeline import faiss_index

    rng = np.random.default_rng(0)
    x = clustered(args.n + args.queries, args.dim, 2000, rng)
    base, q = x[:args.n], x[args.n:]
    empty = faiss.index_factory(args.dim, args.index_str, faiss.METRIC_INNER_PRODUCT)
    empty.train(base[:min(args.n, 50_000)])
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        tmp = Path(tmp)
        blocks = ((empty.sa_encode(base[s:s + 50_000]), np.arange(s, min(s + 50_000, args.n), dtype=np.int64))
                  for s in range(0, args.n, 50_000))
        (tmp / "scratch").mkdir()
        index = faiss_index.add_codes_on_disk(faiss.clone_index(empty), blocks, tmp / "lists", tmp / "scratch")
        faiss_index.write_index(index, tmp / "index.faissindex")
        del index
        lists = tmp / "lists" / "lists.ivfdata"
        ivf = faiss_index.ivf_of(empty)
        ivf.nprobe = args.nprobe
        probed = np.unique(ivf.quantizer.search(q, args.nprobe)[1])
        print(f"machine: {os.cpu_count()} CPUs; {args.n:,} x {args.dim} vectors, {args.index_str}, lists on disk "
              f"{lists.stat().st_size / 2**20:.0f} MiB; {args.queries:,} queries in blocks of {args.block}, "
              f"k={args.k}, nprobe={args.nprobe} ({len(probed)} of {ivf.nlist} lists probed in all)")

        def run(way: str):
            drop_pages(lists)
            index = faiss_index.read_index(tmp / "index.faissindex", "index", mmap=True)
            faiss_index.set_search_params(index, {"nprobe": args.nprobe})
            block_probed = 0
            r0, t0 = read_bytes(), time.perf_counter()
            out = []
            for s in range(0, len(q), args.block):
                xq = q[s:s + args.block]
                if way == "by query":   # faiss's search, ties ordered by id as the pipeline orders them
                    d, i = index.search(xq, args.k)
                    out.append(faiss_index.merge_results([d], [i], args.k, index.metric_type))
                else:
                    out.append(faiss_index.search_by_list(index, xq, args.k, args.group_mb << 20))
                lists_here = np.unique(ivf.quantizer.search(xq, args.nprobe)[1])
                block_probed += sum(faiss_index.ivf_of(index).invlists.list_size(int(i)) for i in lists_here) * \
                    (ivf.code_size + 8)
            seconds, read = time.perf_counter() - t0, read_bytes() - r0
            del index
            return seconds, read, block_probed, np.concatenate([d for d, _ in out]), np.concatenate([i for _, i in out])

        if args.cache_mb:
            print(f"searches in a memory cgroup holding {args.cache_mb} MiB of page cache; groups of "
                  f"{args.group_mb} MiB of lists")
        figures = {}
        for way in ("by query", "by list"):
            with MemoryCgroup(args.cache_mb << 20) if args.cache_mb else contextlib.nullcontext():
                runs = [run(way) for _ in range(args.repeats)]
            figures[way] = runs
            secs = statistics.median(r[0] for r in runs)
            read = statistics.median(r[1] for r in runs)
            print(f"{way:>9}: {len(q) / secs:9.0f} queries/s, read {read / 2**20:7.1f} MiB from storage "
                  f"({read / runs[0][2]:.2f}x the lists its blocks probe; runs: "
                  f"{', '.join(f'{r[0]:.2f} s' for r in runs)})")
        a, b = figures["by query"][0], figures["by list"][0]
        assert np.array_equal(a[4], b[4]) and np.array_equal(a[3], b[3]), "the two ways differ"
        ratio = statistics.median(r[0] for r in figures["by query"]) / statistics.median(r[0] for r in figures["by list"])
        print(f"by list / by query: {ratio:.2f}x the queries/s; same ids and distances")


if __name__ == "__main__":
    main()
