"""Embedding inside the pipeline against the encoder's own speed, whatever the block size.

For each ``--block-sizes`` value, a real build (every stage, Ray workers, CPU) runs on the same corpus, and each
stage that embeds (embed-sampled, index-add, query-neighbors) is timed from its done marker: chunks it embedded
over the stage's whole time (worker start-up, reading texts, faiss work and writes included); each build starts
its own Ray, as a command does. The floor: the
same encoder in this process, with every CPU, embedding the same texts (each stage's, gathered through the
stage's own ``texts``) sorted by length all at once. Printed per stage and block size: chunks/s of both and
their ratio (stage / floor; the issue asks >= 0.95). The corpus is Python's documentation and standard-library
sources tokenized with GPT-2 (``--max-docs`` documents), the embedder the packaged all-MiniLM-L6-v2.

    python benchmarks/bench_embed_stage.py                               # 70-, 250- and 100,000-row blocks
    python benchmarks/bench_embed_stage.py --block-sizes 250 --max-docs 300 --embed-pool 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]
EMBEDDING = ("embed-sampled", "index-add", "query-neighbors")


def stage_texts(wd, name: str) -> list[str]:
    """Every text stage ``name`` embedded in the build of ``wd``, through the stage's own ``texts``."""
    from retro_pipeline.pipeline import load_config, make_stage
    from retro_pipeline.read import ChunkReader, WorkdirReader
    from retro_pipeline.stage import all_stages

    cfg = load_config(wd)
    stage = make_stage({c.name: c for c in all_stages()}[name], wd, cfg)
    state = {"reader": ChunkReader(cfg)}
    if name == "index-add":
        state.update(sampled_rows=WorkdirReader(stage.workdir).sampled_train_rows(), kept=False)
    return [t for b in stage.plan() for t in stage.texts(b, state)]


def floor(texts: list[str], batch_size: int | None, repeats: int) -> float:
    """chunks/s of the encoder over ``texts`` sorted at once (median of ``repeats``), every CPU."""
    from retro_pipeline.config import resolve
    from retro_pipeline.stages.embed import load_encoder

    cfg, _ = resolve({}, {})
    enc = load_encoder(cfg, device="cpu", num_threads=os.cpu_count())
    enc.encode(texts[:256], batch_size=batch_size)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=batch_size)
        rates.append(len(texts) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-sizes", default="70,250,100000")
    ap.add_argument("--max-docs", type=int, default=770, help="documents of the corpus (docs, then sources)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=None, help="the build's and the floor's --batch-size (default: "
                    "the encoder's own batching, by padded tokens)")
    ap.add_argument("--embed-pool", type=int, default=None, help="the build's --embed-pool (default: its own)")
    ap.add_argument("--index-str", default="IVF64,PQ16")
    ap.add_argument("--index-ntrain", default="1500", help="chunks embed-sampled embeds (index-add the rest)")
    ap.add_argument("--repeats", type=int, default=1, help="floor timings per stage (median)")
    args = ap.parse_args()

    from retro_pipeline.config import RunOptions
    from retro_pipeline.demo import build_demo_corpus
    from retro_pipeline.io import read_json
    from retro_pipeline.pipeline import run_stages
    from retro_pipeline.workdir import Workdir

    tmp = tempfile.mkdtemp(prefix="bench_embed_stage_")
    prefix = build_demo_corpus(os.path.join(tmp, "corpus"), max_docs=args.max_docs, include_source=True)
    print(f"corpus {prefix}: {args.max_docs} documents; {args.workers} Ray workers of 1 CPU; floor on "
          f"{os.cpu_count()} threads in one process")
    rows = []
    for bs in [int(x) for x in args.block_sizes.split(",")]:
        wd = Workdir(os.path.join(tmp, f"w{bs}"))
        given = {"data_path": ["1", prefix], "gpt_tokenizer": "gpt2", "block_size": bs, "index_str": args.index_str,
                 "device": "cpu", "seq_length": 512, "global_batch_size": 8,
                 "split": "90,10,0", "eval_iters": 1, "index_ntrain": args.index_ntrain}
        if args.embed_pool:
            given["embed_pool"] = args.embed_pool
        if args.batch_size:
            given["batch_size"] = args.batch_size
        t0 = time.perf_counter()
        run_stages(wd, STAGES, given, RunOptions(num_workers=args.workers, progress=False))
        build_s = time.perf_counter() - t0
        import ray

        ray.shutdown()  # each build starts its own Ray (cold worker processes, as a command does); floors run alone
        for name in EMBEDDING:
            done = read_json(wd.done_marker(name))
            texts = stage_texts(wd, name)
            if not texts:
                print(f"block {bs:>6} rows  {name:16s} embedded nothing (every chunk reused)", flush=True)
                continue
            rate = len(texts) / done["seconds"]
            base = floor(texts, args.batch_size, args.repeats)
            rows.append((bs, name, done["blocks"], len(texts), done["seconds"], rate, base, rate / base))
            print(f"block {bs:>6} rows  {name:16s} {done['blocks']:>4} blocks  {len(texts):>6} chunks  "
                  f"{done['seconds']:7.1f} s  {rate:7.1f} chunks/s  floor {base:7.1f} chunks/s  ratio {rate / base:.2f}",
                  flush=True)
        print(f"block {bs:>6} rows  whole build {build_s:.1f} s", flush=True)
    print("\n| block rows | stage | blocks | chunks | stage s | stage chunks/s | floor chunks/s | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]:,} | {r[1]} | {r[2]} | {r[3]:,} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.2f} |")


if __name__ == "__main__":
    main()
