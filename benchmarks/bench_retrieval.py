"""Retrieval quality on real text with the default settings: the packaged all-MiniLM-L6-v2, ``--index-str
auto``, tuned search parameters.

For each corpus, the pipeline's own stages run with their defaults (db-build, embed-sampled, index-train,
index-add with ``--keep-embeddings``), then:

- recall@10 / recall@20 of the built index against exact search, as index-add measured it on its fixed
  query set (valid-DB chunks), with the index string ``auto`` chose and the tuned nprobe;
- is retrieval meaningful? With the same-document filter off, how often each chunk's own next chunk (same
  document) is among the index's top-10 neighbors of it (itself excluded), against chance (10 / (N - 1)).

Corpora: ``demo`` (the standard-library documentation that ``retro-pipeline build`` uses; small enough
that ``auto`` chooses an exhaustive Flat index) and ``demo+src`` (with the modules' source files, large
enough that ``auto`` chooses IVF).

    python benchmarks/bench_retrieval.py --workdir /tmp/bench_retrieval [--corpus demo --corpus demo+src]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from retro_pipeline import faiss_index
from retro_pipeline.config import RunOptions
from retro_pipeline.demo import build_demo_corpus
from retro_pipeline.pipeline import run_stages
from retro_pipeline.read import WorkdirReader
from retro_pipeline.workdir import Workdir

STAGES = ["db-build", "embed-sampled", "index-train", "index-add"]


def next_chunk_rate(reader: WorkdirReader, k: int = 10) -> tuple[float, float, int]:
    """(rate, chance, chunks tested): the share of chunks whose next chunk of the same document is among the
    index's top-k neighbors of the chunk's own embedding, itself excluded."""
    rows = reader.db_chunks("train")
    x = reader.embeddings("train")
    same_doc_next = np.flatnonzero((rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1]))
    index = reader.index()
    faiss_index.set_search_params(index, reader.search_params()["params"])
    hits = 0
    for s in range(0, len(same_doc_next), 4096):
        q = same_doc_next[s:s + 4096]
        _, found = index.search(np.ascontiguousarray(x[q]), k + 1)
        found = np.where(found == q[:, None], -1, found)  # the chunk itself does not count
        # the first k that are not the chunk itself
        keep = np.argsort(found == -1, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(found, keep, axis=1)
        hits += int((top == (q + 1)[:, None]).any(axis=1).sum())
    return hits / len(same_doc_next), k / (len(rows) - 1), len(same_doc_next)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="Scratch directory; each corpus gets a workdir below it.")
    ap.add_argument("--corpus", action="append", choices=["demo", "demo+src"],
                    help="repeatable [default: both]")
    args = ap.parse_args()
    for name in args.corpus or ["demo", "demo+src"]:
        root = os.path.join(args.workdir, name)
        prefix = build_demo_corpus(os.path.join(root, "corpus"), include_source=name == "demo+src")
        t0 = time.perf_counter()
        out = run_stages(os.path.join(root, "w"), STAGES,
                         {"data_path": ["1", prefix], "gpt_tokenizer": "gpt2", "keep_embeddings": True},
                         RunOptions(progress=False))
        seconds = time.perf_counter() - t0
        reader = WorkdirReader(Workdir(os.path.join(root, "w")))
        search = reader.search_params()
        rate, chance, n = next_chunk_rate(reader)
        index_str = reader.index_info()["index_str"]
        print(f"\n{name}: {out['db-build']['n_chunks_train']} train chunks, index {index_str}, tuned "
              f"{search['params'] or 'no parameters'}; built in {seconds:.0f} s")
        print(f"  recall@10 {search['recall@10']:.4f}  recall@20 {search['recall@20']:.4f} against exact search "
              f"({reader.index_info()['n_queries']} valid-DB queries)")
        print(f"  own next chunk in the top 10 (same-document filter off): {rate:.3f} of {n} chunks; chance "
              f"{chance:.5f} ({rate / chance:.0f}x chance)")
        print("  table: " + json.dumps(search.get("table", [])[:12]))


if __name__ == "__main__":
    main()
