"""Training data memory: does a worker's memory stay flat as the training file grows?

Data: the pre-training passages every machine has (:func:`retro_pipeline.demo.demo_pretrain_passages`, 80-word
passages of the standard library's docs and sources), copied 1x, 4x and 16x (each copy's passages numbered, so
no two rows are equal) into a JSONL file of ``{"text": ...}`` rows.

For each size, in a fresh process each (peak RSS is the process's own ``ru_maxrss``):

- ``list``: :func:`embedder.data.read_rows`, every row parsed and checked into a list of dicts (what the
  trainer held before), then one pass over them;
- ``rowfile``: :class:`embedder.data.RowFile` (line offsets only; rows read back on demand), one pass reading
  every row back;
- ``train``: ``train --task retromae`` (a hidden-64 BERT from a config, a WordPiece tokenizer trained here),
  ``--max-steps`` steps of batch 32 over the file: the trainer as it runs.

Printed: rows, file size, seconds and peak RSS of each, and the ratio of the 16x to the 1x peak.

    python benchmarks/bench_train_memory.py --out /tmp/bench_mem
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROBE = r"""
import json, resource, sys, time
mode, path, out = sys.argv[1:4]
t0 = time.time()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from embedder.tasks import get_task
from embedder.tasks.base import TaskOptions
task = get_task("retromae")(TaskOptions(model_config={"model_type": "bert"}, tokenizer=sys.argv[4]))
if mode == "list":
    from embedder.data import read_rows
    rows = read_rows(path, task)
    n = sum(len(r["text"]) for r in rows)
elif mode == "rowfile":
    from embedder.data import RowFile
    rows = RowFile(path, task)
    n = sum(len(rows[i]["text"]) for i in range(len(rows)))
else:
    from embedder.trainer import TrainConfig, train
    cfg = json.loads(sys.argv[5])
    train(TrainConfig(task="retromae", train_file=path, output_dir=out, progress=False,
                      options=TaskOptions(model_config=cfg, tokenizer=sys.argv[4], max_length=64),
                      batch_size=32, max_steps=int(sys.argv[6]), lr=1e-4))
    n = 0
print(json.dumps({"seconds": time.time() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "chars": n}))
"""


def write_copies(passages: list[str], copies: int, path: str) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for c in range(copies):
            for i, p in enumerate(passages):
                f.write(json.dumps({"text": f"[{c}.{i}] {p}"}) + "\n")
    return copies * len(passages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="scratch directory")
    ap.add_argument("--copies", default="1,4,16", help="sizes, as copies of the passages")
    ap.add_argument("--max-steps", type=int, default=20, help="steps of the train runs")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from retro_pipeline.demo import demo_pretrain_passages

    passages = demo_pretrain_passages([], set())
    tok_dir = os.path.join(args.out, "tok")
    if not os.path.isdir(tok_dir):
        src = os.path.join(args.out, "tok.jsonl")
        write_copies(passages, 1, src)
        subprocess.run([sys.executable, "-m", "retro_pipeline", "train-tokenizer", "--input", src, "--output", tok_dir,
                        "--vocab-size", "4000", "--kind", "wordpiece"], check=True, capture_output=True)
    model_cfg = json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 128})
    print(f"machine: {os.cpu_count()} CPUs; {len(passages):,} passages a copy")
    print(f"{'copies':>6} {'rows':>9} {'file MB':>8} | {'mode':>8} {'seconds':>8} {'peak RSS MB':>12}")
    peaks: dict[str, list[float]] = {}
    for copies in [int(c) for c in args.copies.split(",")]:
        path = os.path.join(args.out, f"rows-{copies}.jsonl")
        rows = write_copies(passages, copies, path)
        size = os.path.getsize(path) / 2**20
        for mode in ("list", "rowfile", "train"):
            out = os.path.join(args.out, f"run-{mode}-{copies}-{time.time_ns()}")
            r = subprocess.run([sys.executable, "-c", PROBE, mode, path, out, tok_dir, model_cfg, str(args.max_steps)],
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{mode} x{copies} failed:\n{r.stderr[-3000:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            peaks.setdefault(mode, []).append(got["peak_rss_mb"])
            print(f"{copies:>6} {rows:>9,} {size:>8.1f} | {mode:>8} {got['seconds']:>8.1f} {got['peak_rss_mb']:>12.0f}",
                  flush=True)
    for mode, p in peaks.items():
        print(f"{mode}: peak RSS largest / smallest file = {p[-1] / p[0]:.2f}x")


if __name__ == "__main__":
    main()
