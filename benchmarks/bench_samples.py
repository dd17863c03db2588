"""Pretraining-sample building at a billion tokens: ours (numpy) against megatron-core's own builder (its C++
helpers), on the same corpora, in one process.

    python benchmarks/bench_samples.py [--tokens 1e9] [--repeats 3] [--seq-length 2048]

Corpora: synthetic Megatron indexed datasets whose .idx holds --tokens tokens in documents of log-normal
lengths (median ~600 tokens); the .bin is a sparse file of the right size (building samples reads lengths
only). Two cases: one corpus (a GPTDataset per split), and a 0.7/0.3 blend of two corpora of --tokens/2 each
(BlendedDataset). Each builds the train, valid and test samples Megatron's training asks for --split 98,2,0,
one epoch of train (--train-samples), --global-batch-size 256, --eval-interval 2000, --eval-iters 50.
Measured, each as a median over --repeats (megatron-core with its index cache off, so each run builds):

* ours          retro_pipeline.samples.split_samples: document, sample and shuffle indices, blending
* megatron-core BlendedMegatronDatasetBuilder(MultiSplitGPTDataset, ...).build(), as pretrain_retro.py

It prints seconds, samples/s and the ratio, and checks that the first 2,000 samples of each split have the
same corpus and stream start in both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def write_corpus(prefix: str, n_tokens: int, seed: int) -> int:
    """An indexed dataset of about ``n_tokens`` uint16 tokens: a real .idx and a sparse .bin."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(6.4, 1.0, int(n_tokens / 900) + 1000)).astype(np.int64)
    lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1].astype(np.int32)
    n = len(lengths)
    pointers = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", n)
                + struct.pack("<Q", n + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)
    return int(lengths.sum())


def megatron_build(data_path, split, seed, seq, sizes):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.retro.query.multi_split_gpt_dataset import (
        MultiSplitGPTDataset, MultiSplitGPTDatasetConfig)
    from megatron.core.datasets.utils import get_blend_from_list

    class Tok:
        eod = 0
        unique_identifiers = {"class": "bench"}

    config = MultiSplitGPTDatasetConfig(
        random_seed=seed, sequence_length=seq, blend=get_blend_from_list(data_path),
        blend_per_split=[None, None, None], split=split, split_preprocessing=split, path_to_cache=None,
        return_document_ids=False, tokenizer=Tok(), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, mid_level_dataset_surplus=0.005)
    return BlendedMegatronDatasetBuilder(MultiSplitGPTDataset, list(sizes), lambda: True, config).build()


def clear_megatron_cache(prefixes):
    """megatron-core caches a GPTDataset's indices in PREFIX/cache/ (a directory named like the prefix)."""
    import shutil

    for p in prefixes:
        shutil.rmtree(p, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=2048)
    args = ap.parse_args()

    from retro_pipeline.samples import SPLITS, asked_counts, split_samples

    try:
        import megatron.core  # noqa: F401
        have_megatron = True
    except ImportError:
        have_megatron = False
        print("megatron-core is not installed: measuring ours alone (pip install --no-deps megatron-core==0.13.1)")
    tmp = tempfile.mkdtemp(prefix="bench_samples-")
    n = int(args.tokens)
    one = os.path.join(tmp, "one", "corpus")
    a, b = os.path.join(tmp, "a", "corpus"), os.path.join(tmp, "b", "corpus")
    for p in (one, a, b):
        os.makedirs(os.path.dirname(p))
    t_one = write_corpus(one, n, 0)
    t_a, t_b = write_corpus(a, n // 2, 1), write_corpus(b, n // 2, 2)
    cases = [("one corpus", ["1.0", one], [one], [one], t_one),
             ("blend 0.7/0.3", ["0.7", a, "0.3", b], ["0.7", a, "0.3", b], [a, b], t_a + t_b)]
    print(f"{n:,} tokens a case, seq_length {args.seq_length}, median of {args.repeats}")
    for name, data_path, megatron_path, prefixes, tokens in cases:
        cfg = types.SimpleNamespace(data_path=data_path, split="98,2,0", seed=1234, seq_length=args.seq_length,
                                    chunk_length=64, gpt_tokenizer="gpt2", train_samples=None,
                                    global_batch_size=256, eval_interval=2000, eval_iters=50)
        sizes = asked_counts(cfg)
        ours_t, theirs_t = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours = split_samples(cfg)
            ours_t.append(time.perf_counter() - t0)
            if have_megatron:
                clear_megatron_cache(prefixes)
                t0 = time.perf_counter()
                theirs = megatron_build(megatron_path, "98,2,0", 1234, args.seq_length, sizes)
                theirs_t.append(time.perf_counter() - t0)
        counts = [ours[s].n_samples for s in SPLITS]
        total = sum(counts)
        line = (f"{name:14s} {tokens:,} tokens, samples train/valid/test {counts[0]:,}/{counts[1]:,}/{counts[2]:,}: "
                f"ours {statistics.median(ours_t):.2f} s ({total / statistics.median(ours_t):,.0f} samples/s)")
        if have_megatron:
            med = statistics.median(theirs_t)
            line += f", megatron-core {med:.2f} s; ours / megatron-core time {statistics.median(ours_t) / med:.2f}"
            for k, split in enumerate(SPLITS):
                ss, m = ours[split], theirs[k]
                if m is None or not ss.n_samples:
                    continue
                idx = np.arange(min(2000, ss.n_samples))
                if ss.blended:
                    assert np.array_equal(ss.corpus[idx], m.dataset_index[idx])
                    assert np.array_equal(ss.within[idx], m.dataset_sample_index[idx])
                corpus, start = ss.locate(0, len(idx))
                for j in idx[::97]:
                    mid = m.datasets[corpus[j]] if ss.blended else m
                    s = mid.shuffle_index[ss.within[j]]
                    d, off = mid.sample_index[s]
                    assert start[j] == ss.parts[corpus[j]].starts[d] + off, (split, j)
            line += " (samples equal)"
        print(line, flush=True)
    clear_megatron_cache([one, a, b])
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
