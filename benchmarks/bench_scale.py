"""Does a build scale with its corpus? Wall time and peak memory of every stage at 1x, 4x and 16x a real corpus.

Corpus: the demo corpus (Python's documentation, GPT-2 tokens: :func:`retro_pipeline.demo.build_demo_corpus`)
copied 1x, 4x and 16x into one Megatron corpus (each copy's documents again, in order). Encoder: a random-init
BERT of hidden size 64 with all-MiniLM-L6-v2's tokenizer, so that embedding does not hide the rest. Pretraining
samples: one epoch of the train split at ``--seq-length`` (so they grow with the corpus too).

With ``--ray-workers 1,2`` each size is also built whole on Ray with that many workers (stage times from the
done markers). Each stage runs as its own ``retro-pipeline <stage>`` process with the local executor (its blocks and its
one-off job in that process), and the process's peak RSS (``ru_maxrss``) and wall time are recorded: the
memory of a stage's whole work in one process, which must stay flat as the corpus grows. Per size, the build
also runs with ``--index-shards`` (default 4) to compare. Printed: a table per stage, and the ratios 16x / 1x
of time (linear: 16) and of peak RSS (flat: 1).

    python benchmarks/bench_scale.py --out /tmp/bench_scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]

# Runs a command and reports its wall time, its peak RSS (ru_maxrss: anonymous memory plus the resident pages of
# files it maps, such as the memory-mapped corpus, which the kernel can take back) and, sampled every 10 ms from
# /proc, its peak anonymous memory (RssAnon: what the process itself holds).
MEASURE = r"""
import json, resource, subprocess, sys, tempfile, time
t = time.time()
with tempfile.TemporaryFile() as err:
    p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err)
    anon = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon = max(anon, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.01)
    if p.returncode:
        err.seek(0)
        sys.exit(err.read()[-3000:].decode(errors="replace"))
print(json.dumps({"seconds": time.time() - t, "peak_anon_mb": anon / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def copies_corpus(src: str, copies: int, out: str) -> str:
    import numpy as np

    from retro_pipeline.corpus import IndexedDataset, IndexedDatasetWriter

    if os.path.exists(out + ".idx"):
        return out
    ds = IndexedDataset(src)
    docs = [np.asarray(ds[i]) for i in range(len(ds))]
    with IndexedDatasetWriter(out, docs[0].dtype) as w:
        for _ in range(copies):
            for d in docs:
                w.add_document(d)
    return out


def tiny_encoder(out: str) -> str:
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embedder import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=512)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="scratch directory (corpora, encoder, workdirs)")
    ap.add_argument("--copies", default="1,4,16")
    ap.add_argument("--shards", type=int, default=4, help="the sharded variant's --index-shards (0: none)")
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--index-str", default="IVF64,PQ16")
    ap.add_argument("--ray-workers", default="", help="also build on Ray with these worker counts (e.g. 1,2): one "
                    "`build` process each, stage times from its done markers (the workers' memory is not measured)")
    ap.add_argument("--block-size", type=int, help="--block-size of every stage: with one that every size "
                    "exceeds, blocks are the same at every size, as on a corpus past the default cap (small "
                    "inputs are cut into ~64 blocks, which grow with the input until --block-size caps them)")
    ap.add_argument("--index-ntrain", help="--index-ntrain (auto: every chunk of a small DB, then 64 per auto IVF "
                    "list, so the training sample grows with the corpus)")
    ap.add_argument("--plot", help="write a log-log plot of time and peak RSS per stage against the train chunks "
                    "(PNG or SVG, by the name's suffix)")
    ap.add_argument("--from-json", help="plot and print the figures of an earlier run's scale.json; build nothing")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        summarize(results)
        if args.plot:
            plot(results, args.plot)
        return
    os.makedirs(args.out, exist_ok=True)
    from retro_pipeline.demo import build_demo_corpus

    src = build_demo_corpus(os.path.join(args.out, "demo"))
    enc = tiny_encoder(os.path.join(args.out, "enc"))
    results = []
    print(f"machine: {os.cpu_count()} CPUs; stages as local-executor processes", flush=True)
    for copies in [int(c) for c in args.copies.split(",")]:
        prefix = copies_corpus(src, copies, os.path.join(args.out, f"corpus{copies}"))
        for shards in [1] + ([args.shards] if args.shards > 1 else []):
            wd = os.path.join(args.out, f"w{copies}-s{shards}-{time.time_ns()}")
            config = os.path.join(args.out, f"config-{copies}-{shards}.json")   # every stage's options
            with open(config, "w") as f:
                given = {"data_path": [prefix], "gpt_tokenizer": "gpt2", "embedder": enc, "device": "cpu",
                         "seq_length": args.seq_length, "index_str": args.index_str, "index_shards": shards}
                if args.block_size:
                    given["block_size"] = args.block_size
                if args.index_ntrain:
                    given["index_ntrain"] = args.index_ntrain
                json.dump(given, f)
            common = ["--workdir", wd, "--executor", "local", "--no-progress", "--config", config]
            for stage in STAGES:
                cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "retro_pipeline", stage, *common]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"{stage} x{copies} shards {shards} failed:\n{r.stderr[-3000:]}")
                got = json.loads(r.stdout.strip().splitlines()[-1])
                done = json.load(open(os.path.join(wd, "markers", stage, "_done.json")))
                row = {"copies": copies, "shards": shards, "stage": stage, **got,
                       "stage_seconds": done["seconds"], "rows": done.get("n_chunks_train") or
                       done.get("n_chunks") or done.get("n_chunks_added") or done.get("n_chunks_train")}
                results.append(row)
                print(f"x{copies:<3} shards {shards}  {stage:<16} {got['seconds']:7.1f} s  "
                      f"peak RSS {got['peak_rss_mb']:7.0f} MB  peak anonymous {got['peak_anon_mb']:7.0f} MB",
                      flush=True)
        for workers in [int(w) for w in args.ray_workers.split(",") if w]:
            wd = os.path.join(args.out, f"w{copies}-ray{workers}-{time.time_ns()}")
            config = os.path.join(args.out, f"config-{copies}-1.json")
            cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "retro_pipeline", "build", "--workdir", wd,
                   "--num-workers", str(workers), "--no-progress", "--config", config]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"build on Ray x{copies} {workers} workers failed:\n{r.stderr[-3000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            stages = {st: json.load(open(os.path.join(wd, "markers", st, "_done.json")))["seconds"] for st in STAGES}
            results.append({"copies": copies, "ray_workers": workers, "build_seconds": got["seconds"],
                            "stage_seconds": stages})
            print(f"x{copies:<3} Ray, {workers} workers: build {got['seconds']:.1f} s (" +
                  ", ".join(f"{st} {sec:.1f}" for st, sec in stages.items()) + ")", flush=True)
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(results, f, indent=1)
    summarize(results)
    if args.plot:
        plot(results, args.plot)


def summarize(results: list[dict]) -> None:
    """Per stage and shard count: the time and peak-RSS ratios of the largest size to the smallest, and the time
    of each size against linear growth from the one before (1.0 = linear)."""
    local = [r for r in results if "stage" in r]
    sizes = sorted({r["copies"] for r in local})
    lo, hi = sizes[0], sizes[-1]
    print(f"\n{'stage':<16} {'shards':>6} {'time x' + str(hi) + '/x' + str(lo):>14} {'RSS x' + str(hi) + '/x' + str(lo):>13} "
          f"{'anon x' + str(hi) + '/x' + str(lo):>14}")
    for shards in sorted({r["shards"] for r in local}):
        for stage in STAGES:
            a = next(r for r in local if r["copies"] == lo and r["shards"] == shards and r["stage"] == stage)
            b = next(r for r in local if r["copies"] == hi and r["shards"] == shards and r["stage"] == stage)
            steps = []
            for x, y in zip(sizes, sizes[1:]):
                u = next(r for r in local if r["copies"] == x and r["shards"] == shards and r["stage"] == stage)
                v = next(r for r in local if r["copies"] == y and r["shards"] == shards and r["stage"] == stage)
                steps.append(f"x{x}->x{y} {v['seconds'] / u['seconds'] / (y / x):.2f}")
            anon = f"{b['peak_anon_mb'] / a['peak_anon_mb']:>14.2f}" if a.get("peak_anon_mb") else f"{'-':>14}"
            print(f"{stage:<16} {shards:>6} {b['seconds'] / a['seconds']:>14.2f} "
                  f"{b['peak_rss_mb'] / a['peak_rss_mb']:>13.2f} {anon}   time / linear: {', '.join(steps)}")


def plot(results: list[dict], path: str) -> None:
    """Two log-log panels against the train chunks: each stage's wall time (with a slope-1 line: linear) and
    its process's peak RSS (flat is the goal), one-index builds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = [r for r in results if "stage" in r and r["shards"] == 1]
    chunks = {r["copies"]: r["rows"] for r in local if r["stage"] == "db-build"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, stage in enumerate(STAGES):
        rows = sorted((chunks[r["copies"]], r["seconds"], r["peak_rss_mb"], r.get("peak_anon_mb"))
                      for r in local if r["stage"] == stage)
        x = [r[0] for r in rows]
        color = f"C{n}"
        ax_t.plot(x, [r[1] for r in rows], "o-", color=color, label=stage)
        ax_m.plot(x, [r[2] for r in rows], "o-", color=color, label=f"{stage}: peak RSS")
        if all(r[3] for r in rows):
            ax_m.plot(x, [r[3] for r in rows], "s:", color=color, label=f"{stage}: peak anonymous")
    xs = sorted(chunks.values())
    top = max(r["seconds"] for r in local if chunks[r["copies"]] == xs[-1])
    ax_t.plot(xs, [top * x / xs[-1] for x in xs], "k--", lw=1, label="linear (slope 1)")
    for ax, what in ((ax_t, "wall time (s)"), (ax_m, "memory of the stage's process (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train chunks")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.set_ylim(50, 2000)
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=6, ncol=2)
    ax_t.set_title("time per stage (each its own process)")
    ax_m.set_title("memory per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
