"""A whole build against the time the encoder alone takes to embed the same chunks.

The corpus is real text of at least ``--min-tokens`` GPT-2 tokens (``benchmarks/corpora.py``: Python's
documentation and standard-library sources). One build runs every stage (Ray workers, CPU, the packaged
all-MiniLM-L6-v2, an IVF-PQ index: ``--index-str auto`` picks one for this size) and is timed as a whole and per
stage (done markers). The floor: the same encoder in this process, on every CPU, embedding the chunks the build
must embed at least once, every train-DB chunk and every query chunk, sorted by length all at once
(``Encoder.encode`` with its default batching). Printed: each stage's time beside the floor's time for the
chunks that stage embedded, and the whole build over the whole floor (the issue asks <= 1.15).

    python benchmarks/bench_build.py                       # 2.1M tokens, 96 samples of 2048 tokens
    python benchmarks/bench_build.py --min-tokens 500000 --train-samples 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-tokens", type=int, default=2_100_000)
    ap.add_argument("--train-samples", type=int, default=96)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--index-str", default="auto")
    ap.add_argument("--index-ntrain", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU)")
    ap.add_argument("--repeats", type=int, default=2, help="floor timings (median)")
    ap.add_argument("--workdir", default=None, help="where to build (default: a temporary directory)")
    args = ap.parse_args()

    from bench_embed_stage import stage_texts
    from corpora import stdlib_corpus
    from retro_pipeline.config import RunOptions, resolve
    from retro_pipeline.io import read_json
    from retro_pipeline.pipeline import load_config, run_stages
    from retro_pipeline.read import ChunkReader, WorkdirReader
    from retro_pipeline.stages.embed import load_encoder
    from retro_pipeline.workdir import Workdir

    tmp = tempfile.mkdtemp(prefix="bench_build_")
    prefix, n_docs, n_tokens = stdlib_corpus(os.path.join(tmp, "corpus"), args.min_tokens)
    wd = Workdir(args.workdir or os.path.join(tmp, "w"))
    given = {"data_path": ["1", prefix], "gpt_tokenizer": "gpt2", "device": "cpu", "index_str": args.index_str,
             "index_ntrain": args.index_ntrain, "train_samples": args.train_samples, "seq_length": args.seq_length}
    print(f"corpus {prefix}: {n_docs} documents, {n_tokens:,} GPT-2 tokens; {os.cpu_count()} CPUs", flush=True)

    def texts_of(wd):
        reader = ChunkReader(load_config(wd))
        return reader.texts(WorkdirReader(wd).db_chunks("train")), stage_texts(wd, "query-neighbors")

    def floor(texts: list[str]) -> float:
        """Seconds the encoder takes over ``texts`` sorted at once, in this process on every CPU (Ray stopped)."""
        enc = load_encoder(resolve({}, {})[0], device="cpu", num_threads=os.cpu_count())
        enc.encode(texts[:256])  # warm-up
        t0 = time.perf_counter()
        enc.encode(texts)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run_stages(wd, STAGES, given, RunOptions(num_workers=args.workers, progress=False))
    build_s = time.perf_counter() - t0
    index_str = (read_json(wd.done_marker("index-train")) or {}).get("index_str") or load_config(wd).index_str
    print(f"build: {build_s:.1f} s, index {index_str}", flush=True)
    import ray

    ray.shutdown()  # the floor runs alone
    train, query = texts_of(wd)
    embedded = {"embed-sampled": len(stage_texts(wd, "embed-sampled")), "index-add": len(stage_texts(wd, "index-add")),
                "query-neighbors": len(query)}
    floors = [floor(train + query) for _ in range(args.repeats)]
    floor_s = statistics.median(floors)
    rate = (len(train) + len(query)) / floor_s
    print(f"floor: {len(train):,} train-DB + {len(query):,} query chunks in {' s, '.join(f'{x:.1f}' for x in floors)} s "
          f"(median {floor_s:.1f} s, {rate:.1f} chunks/s)")

    print("\n| stage | stage s | chunks embedded | floor s for them | stage / floor |")
    print("|---|---:|---:|---:|---:|")
    for name in STAGES:
        s = float(read_json(wd.done_marker(name))["seconds"])
        n = embedded.get(name, 0)
        fl = n / rate
        print(f"| {name} | {s:.1f} | {n:,} | {fl:.1f} | {s / fl:.2f} |" if n else f"| {name} | {s:.1f} | 0 | - | - |")
    print(f"| **whole build** | {build_s:.1f} | {sum(embedded.values()):,} | {floor_s:.1f} | "
          f"**{build_s / floor_s:.2f}** |")


if __name__ == "__main__":
    main()
