"""db-build throughput against naive per-chunk loops, on the same corpus, in one process.

    python benchmarks/bench_db_build.py [--repeats 3] [--workers 2] [--max-docs N]

Corpus: --copies copies of the demo corpus with the standard library's source files (1.7M GPT-2 tokens a
copy), GPT-2 BPE,
the packaged all-MiniLM-L6-v2 tokenizer, chunk length 64. Measured, each as a median over --repeats:

* pipeline, local   db-build with the local executor (one process), blocks + merge
* pipeline, ray     db-build on a Ray pool of --workers actors (Ray already started), blocks + merge
* naive, hf         Megatron's loop: per chunk, detokenize with the GPT tokenizer object and tokenize with
                    the BERT tokenizer object (transformers), as Megatron's build_partial_db does
* naive, rust       the same loop calling the Rust `tokenizers` objects directly, one chunk at a time

It prints tokens/s and chunks/s of each and the ratios, and checks that all paths classify the same chunks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def naive_loop(ds, eod, chunk_length, detok, tok):
    """Per document, per chunk: detokenize, retokenize, classify (no batching)."""
    valid = 0
    lens = []
    for doc_id in range(len(ds)):
        doc = ds.get(doc_id)
        if len(doc) and doc[-1] == eod:
            doc = doc[:-1]
        for s in range(0, len(doc), chunk_length):
            n = len(tok(detok(doc[s:s + chunk_length].tolist())))
            lens.append(n)
            valid += n > 0
    return valid, np.array(lens)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=100)
    ap.add_argument("--copies", type=int, default=3,
                    help="corpus = this many copies of the demo documents, so that worker start-up "
                         "(about 1 s: imports, tokenizer tables) does not dominate")
    args = ap.parse_args()

    from retro_pipeline.config import RunOptions
    from retro_pipeline.corpus import IndexedDataset, IndexedDatasetWriter
    from retro_pipeline.demo import build_demo_corpus
    from retro_pipeline.pipeline import run_stages
    from embedder.settings import default_model_path
    from retro_pipeline.tokenizers import load_embedder_tokenizer, load_gpt_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench_db_")
    src = IndexedDataset(build_demo_corpus(os.path.join(tmp, "corpus"), max_docs=args.max_docs, include_source=True))
    prefix = os.path.join(tmp, "corpus", f"x{args.copies}")
    with IndexedDatasetWriter(prefix, src.dtype) as w:
        for _ in range(args.copies):
            w.add_flat(np.asarray(src.tokens), np.asarray(src.sequence_lengths))
    ds = IndexedDataset(prefix)
    gpt = load_gpt_tokenizer("gpt2")
    given = {"data_path": ["1", prefix], "gpt_tokenizer": "gpt2", "block_size": args.block_size}
    counter = iter(range(10**6))

    def pipeline(executor, **kw):
        wd = os.path.join(tmp, f"w{next(counter)}")
        return run_stages(wd, ["db-build"], given, RunOptions(executor=executor, progress=False, **kw))["db-build"]

    print(f"corpus: {len(ds)} documents, {ds.num_tokens} tokens; {os.cpu_count()} CPUs", file=sys.stderr)
    rows = {}
    t, done = timed(lambda: pipeline("local"), args.repeats)
    n_chunks = done["n_chunks_train"] + done["n_chunks_valid"] + done["n_chunks_invalid"]
    n_valid = done["n_chunks_train"] + done["n_chunks_valid"]
    rows["pipeline, local (1 process)"] = t

    import ray

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="warning")
    time.sleep(10)  # Ray's own agents use the CPUs for a few seconds after start-up
    pipeline("ray", num_workers=args.workers)  # warm-up: actor start-up is not db-build work
    rows[f"pipeline, ray ({args.workers} workers)"] = timed(lambda: pipeline("ray", num_workers=args.workers),
                                                            args.repeats)[0]
    ray.shutdown()

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf_gpt = PreTrainedTokenizerFast(tokenizer_object=gpt.tokenizer)
    hf_bert = AutoTokenizer.from_pretrained(default_model_path())
    t, (v_hf, _) = timed(lambda: naive_loop(ds, gpt.eod_id, 64, lambda ids: hf_gpt.decode(ids, skip_special_tokens=True),
                                            lambda text: hf_bert.convert_tokens_to_ids(hf_bert.tokenize(text))),
                         args.repeats)
    rows["naive, hf (Megatron's loop)"] = t
    bert = load_embedder_tokenizer(None)
    t, (v_rust, _) = timed(lambda: naive_loop(ds, gpt.eod_id, 64, gpt.tokenizer.decode,
                                              lambda text: bert.encode(text, add_special_tokens=False).ids),
                           args.repeats)
    rows["naive, rust per chunk"] = t
    assert v_hf == v_rust == n_valid, (v_hf, v_rust, n_valid)

    print(f"\n{'path':34s} {'seconds':>8s} {'tokens/s':>11s} {'chunks/s':>10s}")
    for name, sec in rows.items():
        print(f"{name:34s} {sec:8.2f} {ds.num_tokens / sec:11,.0f} {n_chunks / sec:10,.0f}")
    print()
    for p in [k for k in rows if k.startswith("pipeline")]:
        for b in [k for k in rows if k.startswith("naive")]:
            print(f"{p} vs {b}: {rows[b] / rows[p]:.1f}x")
    print(f"\n{n_chunks} chunks ({n_valid} valid), all paths agree on which are valid")


if __name__ == "__main__":
    main()
