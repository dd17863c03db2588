"""Pretraining samples of a split, exactly as Megatron's RETRO training builds them (docs/formats.md §4).

Megatron (megatron-core 0.13.1, ``pretrain_retro.py``) pairs its training sample ``i`` with chunk rows
``i*L .. i*L+L-1`` of the query files, where sample ``i`` is sample ``i`` of its ``MultiSplitGPTDataset``
(one corpus) or ``BlendedDataset`` (a weighted blend of several). This module builds the same samples in
numpy, with no dependency on megatron-core:

- **Split.** Each corpus's documents are cut into contiguous train/valid/test ranges by the split string:
  proportions normalised, cumulative book-ends, ``int(round(bookend * n_docs))``; a zero-width split does
  not exist (Megatron builds no dataset for it).
- **GPTDataset** (one corpus, one split, ``num_samples`` asked): as many epochs as ``num_samples *
  seq_length + 1`` tokens need; the document index is the split's documents repeated once per epoch and
  shuffled with ``numpy.random.RandomState(seed)`` (the final epoch shuffled on its own when it would give
  fewer than 80% of an epoch's samples); sample ``j`` of the flattened stream starts at token ``j *
  seq_length`` and holds ``seq_length + 1`` tokens (windows cross documents; the last partial one is
  dropped); a shuffle index (same RandomState) permutes the samples.
- **Blend.** Weights normalised; each corpus's GPTDataset is asked ``ceil(ceil(N * w) * 1.005)`` samples
  (Megatron's ``mid_level_dataset_surplus`` default), the blend holds ``sum(ceil(N * w))``, and sample ``i``
  comes from the corpus whose share is furthest behind its weight (Megatron's ``build_blending_indices``).
- **Counts** are Megatron's: ``train_samples``; valid ``(train_iters // eval_interval + 1) * eval_iters *
  global_batch_size`` with ``train_iters = train_samples // global_batch_size``; test ``eval_iters *
  global_batch_size``.

Sample ``i``'s first ``seq_length`` tokens are its ``L = seq_length / chunk_length`` chunks, chunk ids
``i*L .. i*L+L-1``; the documents it touches (for the own-sample neighbor filter) are a contiguous run of its
corpus's document index.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np

from retro_pipeline.arrays import offsets
from retro_pipeline.errors import RetroError

SPLITS = ("train", "valid", "test")
SAMPLE_SCHEME = "megatron-core-0.13.1"  # in every sample hash: samples cut another way never share a directory
MID_LEVEL_SURPLUS = 0.005  # Megatron-LM's --mid-level-dataset-surplus default
FINAL_EPOCH_THRESHOLD = 0.80  # GPTDataset separates a final epoch that yields fewer samples than this share


# ---------------------------------------------------------------------------------------------- the split
def normalize(weights) -> list[float]:
    """Weights divided by their sum, in float64 (Megatron's ``normalize``)."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """The (begin, end) fractions of train, valid and test; None for a split of zero width."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", split)]
    parts += [0.0] * (len(SPLITS) - len(parts))
    ends = [0]
    for p in normalize(parts):
        ends.append(ends[-1] + p)
    return [(a, b) if b > a else None for a, b in zip(ends[:-1], ends[1:])]


def split_doc_range(bookends: tuple[float, float], n_docs: int) -> tuple[int, int]:
    """The contiguous document range [begin, end) of a split of a corpus of ``n_docs`` documents."""
    return int(round(bookends[0] * float(n_docs))), int(round(bookends[1] * float(n_docs)))


def megatron_blend(data_path) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) as Megatron's training reads ``retro_gpt_data_path``: one corpus is unweighted (a
    single GPTDataset), several are a weighted BlendedDataset."""
    pairs = [(float(data_path[i]), data_path[i + 1]) for i in range(0, len(data_path), 2)]
    if len(pairs) == 1:
        return [pairs[0][1]], None
    return [p for _, p in pairs], [w for w, _ in pairs]


def megatron_data_path(data_path) -> list[str]:
    """The ``retro_gpt_data_path`` list written to config.json for our stored ``data_path``."""
    prefixes, weights = megatron_blend(data_path)
    if weights is None:
        return list(prefixes)
    return [s for w, p in zip(weights, prefixes) for s in (repr(w), p)]


def megatron_sample_counts(train_samples: int, eval_interval: int, eval_iters: int,
                           global_batch_size: int) -> tuple[int, int, int]:
    """Samples Megatron's training asks of train, valid and test (``get_train_valid_test_num_samples``)."""
    train_iters = train_samples // global_batch_size
    return (train_samples, (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
            eval_iters * global_batch_size)


def blend_sizes(weights: list[float], size: int, surplus: float = 0.0) -> list[int]:
    """Samples asked of each corpus of a blend of ``size`` samples (``_get_size_per_split_per_dataset``)."""
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]


def blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, sample within that corpus) of each blended sample: each sample goes to the corpus whose count
    is furthest below ``weight * max(i, 1)`` (the first such on ties), as Megatron's ``build_blending_indices``.

    A sequential greedy, in plain Python floats (the same IEEE double arithmetic); about 0.3 µs per sample
    for two corpora, so a billion-token blend (~500k samples of 2,048 tokens) takes a fraction of a second.
    """
    n = len(weights)
    corpus = np.zeros(size, dtype=np.int16)
    within = np.zeros(size, dtype=np.int64)
    w = [float(x) for x in weights]
    counts = [0] * n
    if n == 2:  # the common case, unrolled
        w0, w1 = w
        c0 = c1 = 0
        pick = bytearray(size)
        for i in range(size):
            x = float(i) if i > 1 else 1.0
            if w1 * x - c1 > w0 * x - c0:
                pick[i] = 1
                c1 += 1
            else:
                c0 += 1
        corpus[:] = np.frombuffer(bytes(pick), dtype=np.uint8)
        for d in range(2):
            sel = corpus == d
            within[sel] = np.arange(int(sel.sum()), dtype=np.int64)
        return corpus, within
    idx = range(n)
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best = max(idx, key=lambda d: (w[d] * x - counts[d], -d))
        corpus[i] = best
        within[i] = counts[best]
        counts[best] += 1
    return corpus, within


# ------------------------------------------------------------------------------------ one corpus, one split
class GPTSamples:
    """The samples of one corpus's split, as megatron-core's GPTDataset builds them (never materialised)."""

    def __init__(self, lengths: np.ndarray, begin: int, end: int, num_samples: int | None, seq_length: int,
                 seed: int):
        self.seq_length = seq_length
        docs = np.arange(begin, end, dtype=np.int32)
        tokens_per_epoch = int(np.sum(lengths[docs], dtype=np.int64))
        self.tokens_per_epoch = tokens_per_epoch
        if tokens_per_epoch < 2:
            raise ValueError("a split needs at least two tokens")
        epochs = 1
        if num_samples is not None:
            epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
        separate = False
        if epochs > 1:
            sans_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
            per_epoch = (tokens_per_epoch - 1) // seq_length
            separate = num_samples - sans_final < int(FINAL_EPOCH_THRESHOLD * per_epoch)
        rs = np.random.RandomState(seed)
        if separate:
            self.document_index = np.concatenate([_document_index(docs, epochs - 1, rs), _document_index(docs, 1, rs)])
        else:
            self.document_index = _document_index(docs, epochs, rs)
        self.n_built = (epochs * tokens_per_epoch - 1) // seq_length
        dtype = np.uint32 if self.n_built < np.iinfo(np.uint32).max - 1 else np.int64
        if separate:
            first = np.arange(sans_final, dtype=dtype)
            rs.shuffle(first)
            last = np.arange(sans_final, self.n_built, dtype=dtype)
            rs.shuffle(last)
            self.shuffle_index = np.concatenate([first, last])
        else:
            self.shuffle_index = np.arange(self.n_built, dtype=dtype)
            rs.shuffle(self.shuffle_index)
        self.epochs = epochs
        self.starts = offsets(lengths[self.document_index])  # stream position of each document index entry

    def __len__(self) -> int:
        return self.n_built

    def stream_start(self, samples: np.ndarray) -> np.ndarray:
        """First stream position of each of these samples (after the shuffle)."""
        return self.shuffle_index[samples].astype(np.int64) * self.seq_length

    def doc_span(self, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For samples starting at stream positions ``start``: the first and last document index entries
        they touch (Megatron's sample index: the first sample starts at entry 0, offset 0)."""
        lo = np.searchsorted(self.starts, start, side="right") - 1
        lo[start == 0] = 0
        hi = np.searchsorted(self.starts, start + self.seq_length, side="right") - 1
        return lo, hi

    def sample_index(self) -> np.ndarray:
        """Megatron's sample index ([n + 1, 2]: document index entry and offset where each sample starts),
        for comparison with megatron-core."""
        pos = np.arange(self.n_built + 1, dtype=np.int64) * self.seq_length
        d = np.searchsorted(self.starts, pos, side="right") - 1
        d[0] = 0
        d = np.minimum(d, len(self.document_index) - 1)
        return np.stack([d, pos - self.starts[d]], axis=1)


def _document_index(docs: np.ndarray, epochs: int, rs: np.random.RandomState) -> np.ndarray:
    index = np.tile(docs, epochs).astype(np.int32)
    rs.shuffle(index)
    return index


# ------------------------------------------------------------------------------------------- one split
class SampleSet:
    """The samples of one split that Megatron's training reads, with their tokens and documents."""

    def __init__(self, cfg, split: str, n_samples: int | None = None, datasets=None):
        from retro_pipeline.corpus import IndexedDataset

        if cfg.seq_length % cfg.chunk_length:
            raise RetroError(f"--seq-length {cfg.seq_length}: must be a multiple of --chunk-length "
                             f"{cfg.chunk_length}")
        self.split, self.seq_length, self.chunk_length = split, cfg.seq_length, cfg.chunk_length
        self.seed = cfg.seed
        self.L = cfg.seq_length // cfg.chunk_length
        prefixes, weights = megatron_blend(cfg.data_path)
        self.datasets = datasets if datasets is not None else [IndexedDataset(p, validate=False) for p in prefixes]
        self.bookends = split_matrix(cfg.split)[SPLITS.index(split)]
        self.exists = self.bookends is not None
        self.doc_ranges = [split_doc_range(self.bookends, len(ds)) if self.exists else (0, 0)
                           for ds in self.datasets]
        self.blended = weights is not None
        if n_samples is None:
            n_samples = self.one_epoch() if self.exists else 0
        self.n_samples = int(n_samples) if self.exists else 0
        self.parts: list[GPTSamples | None] = [None] * len(self.datasets)
        self.hash = sample_hash(cfg, split, self.n_samples)
        if not self.n_samples:
            self.corpus, self.within = np.zeros(0, np.int16), np.zeros(0, np.int64)
            return
        empty = [ds.prefix for ds, (b, e) in zip(self.datasets, self.doc_ranges) if e - b == 0]
        if empty:
            raise RetroError(f"{empty[0]}: the {split} split ({self._range_text()}) holds no documents of it, but "
                             f"Megatron's training asks {self.n_samples} {split} samples; {self._fix()}")
        if not self.blended:
            self.parts[0] = self._part(0, self.n_samples)
            self.corpus = np.zeros(self.n_samples, np.int16)
            self.within = np.arange(self.n_samples, dtype=np.int64)
            return
        w = normalize(weights)
        asked = blend_sizes(w, self.n_samples, MID_LEVEL_SURPLUS)
        size = sum(blend_sizes(w, self.n_samples))
        self.parts = [self._part(d, k) for d, k in enumerate(asked)]
        self.corpus, self.within = blending_indices(normalize(w), size)
        for d, part in enumerate(self.parts):
            used = int((self.corpus == d).sum())
            if used > len(part):
                raise RetroError(f"{self.datasets[d].prefix}: the {split} blend draws {used} samples of it, more "
                                 f"than the {len(part)} its {self.parts[d].epochs} epoch(s) hold (Megatron stops "
                                 f"here too); change the blend weights or the sample counts")
        self.corpus, self.within = self.corpus[:self.n_samples], self.within[:self.n_samples]

    def _part(self, d: int, num_samples: int) -> GPTSamples:
        b, e = self.doc_ranges[d]
        ds = self.datasets[d]
        try:
            return GPTSamples(ds.sequence_lengths, b, e, num_samples, self.seq_length, self.seed)
        except ValueError:
            raise RetroError(f"{ds.prefix}: the {self.split} split ({self._range_text()}) holds fewer than two "
                             f"tokens; {self._fix()}") from None

    def _range_text(self) -> str:
        a, b = self.bookends
        return f"documents round({a:.4g}·n) .. round({b:.4g}·n) by --split"

    def _fix(self) -> str:
        if self.split == "train":
            return "give more documents or change --split"
        return "give more documents, change --split, or ask fewer with --eval-iters / --global-batch-size"

    def one_epoch(self) -> int:
        """Samples in one epoch of this split: each corpus's ``(tokens - 1) // seq_length``, summed."""
        total = 0
        for ds, (b, e) in zip(self.datasets, self.doc_ranges):
            t = int(np.sum(ds.sequence_lengths[b:e], dtype=np.int64))
            total += max(0, (t - 1) // self.seq_length)
        return total

    # ---- reading samples
    def locate(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Corpus and stream start position of samples ``first..last-1``."""
        corpus = self.corpus[first:last].astype(np.int64)
        start = np.zeros(last - first, np.int64)
        for d in np.unique(corpus):
            sel = corpus == d
            start[sel] = self.parts[int(d)].stream_start(self.within[first:last][sel])
        return corpus, start

    def tokens(self, first: int, last: int) -> np.ndarray:
        """int64 [last - first, seq_length + 1]: the tokens of samples ``first..last-1``."""
        corpus, start = self.locate(first, last)
        n = last - first
        out = np.empty((n, self.seq_length + 1), np.int64)
        width = np.arange(self.seq_length + 1, dtype=np.int64)
        for d in np.unique(corpus):
            sel = np.flatnonzero(corpus == d)
            part, ds = self.parts[int(d)], self.datasets[int(d)]
            pos = (start[sel][:, None] + width[None, :]).reshape(-1)
            k = np.searchsorted(part.starts, pos, side="right") - 1
            doc = part.document_index[k]
            flat = np.asarray(ds.sequence_offsets, np.int64)[doc] + (pos - part.starts[k])
            out[sel] = ds.tokens[flat].reshape(len(sel), -1)
        return out

    def doc_runs(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The documents samples ``first..last-1`` touch, flattened: (sample offset, corpus, doc id) int64."""
        corpus, start = self.locate(first, last)
        lo = np.zeros(last - first, np.int64)
        hi = np.zeros(last - first, np.int64)
        for d in np.unique(corpus):
            sel = corpus == d
            lo[sel], hi[sel] = self.parts[int(d)].doc_span(start[sel])
        counts = hi - lo + 1
        sample = np.repeat(np.arange(last - first, dtype=np.int64), counts)
        entry = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(offsets(counts)[:-1] - lo, counts)
        corp = np.repeat(corpus, counts)
        doc = np.zeros(len(entry), np.int64)
        for d in np.unique(corpus):
            sel = corp == d
            doc[sel] = self.parts[int(d)].document_index[entry[sel]]
        return sample, corp, doc

    def doc_ids(self, i: int) -> np.ndarray:
        """(dataset_idx, doc_id) int64 [n, 2] of the documents sample ``i`` touches, in stream order."""
        _, corp, doc = self.doc_runs(i, i + 1)
        return np.stack([corp, doc], axis=1)


AUTO_EVAL_ITERS = 50  # Megatron's example RETRO preprocessing value, the most --eval-iters auto gives


def eval_iters(cfg, datasets=None, train: int | None = None) -> int:
    """``--eval-iters`` as a number: ``auto`` is 50, lowered to the most evaluation batches that one epoch of the
    valid split (else the test split) fills at Megatron's evaluation count, so a small corpus is not asked
    for many epochs of its valid documents."""
    if cfg.eval_iters != "auto":
        return int(cfg.eval_iters)
    if train is None:
        train = _train_count(cfg, datasets)
    evals = train // cfg.global_batch_size // cfg.eval_interval + 1
    for name in ("valid", "test"):
        ss = SampleSet(cfg, name, 0, datasets)
        if ss.exists:
            return min(AUTO_EVAL_ITERS, ss.one_epoch() // (evals * cfg.global_batch_size))
    return AUTO_EVAL_ITERS


def _train_count(cfg, datasets=None) -> int:
    if cfg.train_samples is not None:
        return int(cfg.train_samples)
    return SampleSet(cfg, "train", 0, datasets).one_epoch()


def asked_counts(cfg, datasets=None) -> tuple[int, int, int]:
    """Samples Megatron's training asks of train, valid and test for this build's options (``--train-samples``,
    default one epoch of the train split; ``--eval-interval``, ``--eval-iters``, ``--global-batch-size``)."""
    train = _train_count(cfg, datasets)
    return megatron_sample_counts(train, cfg.eval_interval, eval_iters(cfg, datasets, train), cfg.global_batch_size)


def split_samples(cfg, datasets=None) -> dict[str, SampleSet]:
    """The samples of every split that Megatron's training reads for this build's options."""
    counts = asked_counts(cfg, datasets)
    out = {}
    for name, n in zip(SPLITS, counts):
        out[name] = SampleSet(cfg, name, n, datasets)
        datasets = out[name].datasets  # corpora opened once
    return out


def sample_hash(cfg, split: str, n_samples: int) -> str:
    """MD5 over a canonical description of a split's samples, so neighbors never pair with other samples."""
    return hashlib.md5(json.dumps({
        "scheme": SAMPLE_SCHEME, "data_path": megatron_data_path(cfg.data_path), "split": cfg.split,
        "seed": cfg.seed, "seq_length": cfg.seq_length, "chunk_length": cfg.chunk_length,
        "gpt_tokenizer": cfg.gpt_tokenizer, "which": split, "n_samples": n_samples}, sort_keys=True).encode()
    ).hexdigest()
