"""Pretraining samples of a split, as GPT pretraining cuts them (docs/formats.md §4).

Documents of a split are those db-build put there: train = the train DB's documents; the other documents of
each corpus are valid, except a seeded share ``test / (valid + test)`` of them (by ``--split``), which is test.
A split's token stream is its documents (EOD included, as the corpus stores them) in a seeded order, one
epoch after another (each epoch its own seeded order) for as long as the samples asked need. Sample ``i`` is
stream tokens ``[i * seq_length, i * seq_length + seq_length + 1)``: windows that may cross documents. Its
first ``seq_length`` tokens are its ``L = seq_length / chunk_length`` chunks; chunk ``j`` of sample ``i`` has
id ``i * L + j``. The documents a sample touches are a contiguous run of the stream, so they are kept as
(first, last) stream positions, not as lists.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from retro_pipeline.arrays import offsets
from retro_pipeline.errors import RetroError

SPLITS = ("train", "valid", "test")


def split_documents(workdir, cfg) -> dict[str, np.ndarray]:
    """(dataset_idx, doc_id) int64 [n, 2] of each split's documents, in corpus order."""
    import h5py

    from retro_pipeline.corpus import IndexedDataset

    with h5py.File(workdir.merged_db_path("train"), "r") as f:
        train = f["doc_offsets"][:, :2].astype(np.int64)
    fr = cfg.split_fractions()
    out = {"train": train, "valid": [], "test": []}
    for ds_idx, (_, prefix) in enumerate(cfg.blend()):
        n = len(IndexedDataset(prefix, validate=False))
        other = np.setdiff1d(np.arange(n), train[train[:, 0] == ds_idx, 1])
        n_test = int(round(len(other) * fr[2] / (fr[1] + fr[2]))) if fr[1] + fr[2] > 0 else 0
        test = np.zeros(len(other), bool)
        test[np.random.default_rng([cfg.seed, ds_idx, 4]).choice(len(other), n_test, replace=False)] = True
        for name, docs in (("valid", other[~test]), ("test", other[test])):
            out[name].append(np.stack([np.full(len(docs), ds_idx), docs], axis=1))
    for name in ("valid", "test"):
        out[name] = np.concatenate(out[name]).astype(np.int64) if out[name] else np.zeros((0, 2), np.int64)
    return out


class SampleSet:
    """The samples of one split: their count, tokens and documents, without materialising the stream."""

    def __init__(self, workdir, cfg, split: str, n_samples: int | None, docs: np.ndarray | None = None):
        from retro_pipeline.corpus import IndexedDataset

        if cfg.seq_length % cfg.chunk_length:
            raise RetroError(f"--seq-length {cfg.seq_length}: must be a multiple of --chunk-length "
                             f"{cfg.chunk_length}")
        self.split, self.seq_length, self.chunk_length = split, cfg.seq_length, cfg.chunk_length
        self.hash = ""
        self.L = cfg.seq_length // cfg.chunk_length
        self.datasets = [IndexedDataset(p, validate=False) for _, p in cfg.blend()]
        docs = split_documents(workdir, cfg)[split] if docs is None else docs
        self.split_docs = docs
        if len(docs) == 0:
            if n_samples:
                raise RetroError(f"--{'train' if split == 'train' else 'eval'}-samples {n_samples}: the {split} "
                                 f"split has no documents (--split {cfg.split}); ask for 0 or change --split")
            self.docs, self.starts, self.n_samples = docs, np.zeros(1, np.int64), 0
            return
        lengths = np.concatenate([ds.sequence_lengths for ds in self.datasets]).astype(np.int64)
        self.doc_base = offsets([len(ds) for ds in self.datasets])  # global document number of (ds, 0)
        doc_len = lengths[self.doc_base[docs[:, 0]] + docs[:, 1]]
        per_epoch = int(doc_len.sum())
        if per_epoch < self.seq_length + 1 and not n_samples:
            self.docs, self.starts, self.n_samples = docs[:0], np.zeros(1, np.int64), 0
            return
        n = n_samples if n_samples is not None else (per_epoch - 1) // self.seq_length
        need = n * self.seq_length + 1
        epochs = -(-need // per_epoch)
        split_idx = SPLITS.index(split)
        orders = [np.random.default_rng([cfg.seed, split_idx, 5, e]).permutation(len(docs)) for e in range(epochs)]
        order = np.concatenate(orders)
        self.docs = docs[order]
        self.starts = offsets(doc_len[order])
        self.n_samples = int(n)
        self.hash = sample_hash(cfg, split, self.n_samples)

    def doc_span(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """For samples ``first..last-1``: the stream positions of the first and last document each touches."""
        i = np.arange(first, last, dtype=np.int64)
        lo = np.searchsorted(self.starts, i * self.seq_length, side="right") - 1
        hi = np.searchsorted(self.starts, i * self.seq_length + self.seq_length, side="right") - 1
        return lo, hi

    def doc_ids(self, i: int) -> np.ndarray:
        """(dataset_idx, doc_id) int64 [n, 2] of the documents sample ``i`` touches, in stream order."""
        lo, hi = self.doc_span(i, i + 1)
        return self.docs[lo[0]:hi[0] + 1]

    def tokens(self, first: int, last: int) -> np.ndarray:
        """int64 [last - first, seq_length + 1]: the tokens of samples ``first..last-1``."""
        pos = (np.arange(first, last, dtype=np.int64)[:, None] * self.seq_length
               + np.arange(self.seq_length + 1, dtype=np.int64)[None, :]).reshape(-1)
        d = np.searchsorted(self.starts, pos, side="right") - 1
        within = pos - self.starts[d]
        out = np.empty(len(pos), np.int64)
        ds_of = self.docs[d, 0]
        for ds_idx in np.unique(ds_of):
            sel = ds_of == ds_idx
            ds = self.datasets[int(ds_idx)]
            out[sel] = ds.tokens[np.asarray(ds.sequence_offsets, np.int64)[self.docs[d[sel], 1]] + within[sel]]
        return out.reshape(last - first, self.seq_length + 1)


def sample_hash(cfg, split: str, n_samples: int) -> str:
    """MD5 over a canonical description of a split's samples, so neighbors never pair with other samples."""
    return hashlib.md5(json.dumps({
        "data_path": list(cfg.data_path), "split": cfg.split, "split_mode": cfg.split_mode, "seed": cfg.seed,
        "seq_length": cfg.seq_length, "chunk_length": cfg.chunk_length, "gpt_tokenizer": cfg.gpt_tokenizer,
        "which": split, "n_samples": n_samples}, sort_keys=True).encode()).hexdigest()
