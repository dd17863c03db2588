"""RetroDataset: pretraining samples with their neighbors and continuations, as RETRO trains on them
(docs/formats.md §5).

Item ``i`` of a split, with ``L = seq_length / chunk_length`` chunks, ``k`` neighbors per chunk and ``r`` chunks
per neighbor (the neighbor, then its ``r - 1`` continuations)::

    text             int64 [seq_length + 1]           the sample's tokens
    neighbor_chunks  int64 [L, k, r]                  train-DB rows (= chunk ids), -1 where there is none
    neighbor_tokens  int64 [L, k, r * chunk_length]   their GPT tokens, each chunk EOD-padded; all EOD where none
    neighbor_mask    bool  [L, k, r]                  False for a missing neighbor and past the end of its document

A continuation is the next train-DB row only while that row is in the neighbor's own (dataset_idx, doc_id)
document; a -1 neighbor stays missing. (Megatron takes the next row whatever document it is in and turns -1 into
real rows.) Files are opened lazily once per process: a DataLoader worker reopens them after fork, and
pickling drops them. ``RetroDataset`` is a ``torch.utils.data.Dataset``, built the first time the name is
used, so importing this module does not import torch; :class:`RetroSamples` is the same class without torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from retro_pipeline.errors import RetroError


class RetroSamples:
    """``RetroSamples(workdir, split, num_neighbors=None, num_continuations=2)``: item ``i`` is the dict above.

    ``num_neighbors`` (k) defaults to the build's ``--num-neighbors-save``; ``num_continuations`` is r, the
    chunks per neighbor including the neighbor itself. An error unless query-neighbors has finished, and where
    ``retro-pipeline status`` calls the neighbors or the DB stale (a corpus or tokenizer file changed since,
    or settings): ``allow_changed=True`` reads them anyway, with a
    :class:`~retro_pipeline.read.ChangedInputWarning` (None: no check, the caller made it).
    """

    def __init__(self, workdir, split: str, num_neighbors: int | None = None, num_continuations: int = 2,
                 allow_changed: bool | None = False):
        from retro_pipeline.read import WorkdirReader
        from retro_pipeline.tokenizers import load_gpt_tokenizer
        from retro_pipeline.workdir import Workdir

        self.workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
        reader = WorkdirReader(self.workdir)
        cfg = reader.config
        self.split, self.files = split, reader.neighbor_files(split)
        if allow_changed is not None:
            reader.check_built(["db-build", "query-neighbors"], allow_changed)
        self.seq_length, self.chunk_length = cfg.seq_length, cfg.chunk_length
        self.L = cfg.seq_length // cfg.chunk_length
        self.n_samples = self.files[-1][1] // self.L if self.files else 0
        saved = cfg.num_neighbors_save
        self.k = saved if num_neighbors is None else int(num_neighbors)
        if not 1 <= self.k <= saved:
            raise RetroError(f"num_neighbors {num_neighbors}: give 1..{saved} (the --num-neighbors-save of "
                             f"{self.workdir.root}) or None for all")
        if int(num_continuations) < 1:
            raise RetroError(f"num_continuations {num_continuations}: give at least 1 (the neighbor itself)")
        self.r = int(num_continuations)
        self.eod = load_gpt_tokenizer(cfg.gpt_tokenizer).eod_id
        self._starts = np.array([s for s, _, _ in self.files], np.int64)
        self._pid: int | None = None
        self._open: dict | None = None

    def __len__(self) -> int:
        return self.n_samples

    def __getstate__(self):
        return {**self.__dict__, "_pid": None, "_open": None}

    def _state(self) -> dict:
        """Open files of this process: the samples (corpora), the neighbor blocks and the train DB."""
        if self._pid != os.getpid():
            from retro_pipeline.read import WorkdirReader

            ss = WorkdirReader(self.workdir).samples(self.split)
            self._open = {"samples": ss, "datasets": ss.datasets,
                          "doc_start": [np.asarray(ds.sequence_offsets, np.int64) for ds in ss.datasets],
                          "neighbors": [_rows(p, "neighbors") for _, _, p in self.files],
                          "db": _rows(self.workdir.merged_db_path("train"), "chunks")}
            self._pid = os.getpid()
        return self._open

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < self.n_samples:
            raise IndexError(f"sample {i} out of range: the {self.split} split has {self.n_samples} samples")
        h = self._state()
        lo, hi = i * self.L, (i + 1) * self.L  # the sample's chunk rows, in one block file or two
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        last = int(np.searchsorted(self._starts, hi - 1, side="right")) - 1
        nb = np.concatenate([np.asarray(h["neighbors"][b][max(lo, s) - s:min(hi, e) - s, :self.k], np.int64)
                             for b, (s, e, _) in zip(range(first, last + 1), self.files[first:last + 1])])  # [L, k]
        chunks, rows = self.continuations(nb, h["db"])
        return {"text": h["samples"].tokens(i, i + 1)[0], "neighbor_chunks": chunks,
                "neighbor_tokens": self.chunk_tokens(rows, chunks >= 0, h), "neighbor_mask": chunks >= 0}

    def continuations(self, nb: np.ndarray, db) -> tuple[np.ndarray, np.ndarray]:
        """Neighbor ids [L, k] → (chunk ids [L, k, r], -1 past the document or for none; their DB rows
        [L, k, r, 5], zeros where the id is -1)."""
        ids = nb[..., None] + np.arange(self.r)  # the neighbor and the rows after it
        inside = (nb[..., None] >= 0) & (ids < len(db))
        want = np.unique(ids[inside])  # sorted: h5py's fancy reads need it
        table = np.zeros((len(want) + 1, 5), np.int64)  # last row: for ids not read
        if len(want):
            table[:-1] = db[want]
        rows = table[np.where(inside, np.searchsorted(want, ids), len(want))]
        same = inside & (rows[..., :2] == rows[..., :1, :2]).all(-1)  # same (dataset_idx, doc_id) as the neighbor
        rows[~same] = 0
        return np.where(same, ids, -1), rows

    def chunk_tokens(self, rows: np.ndarray, mask: np.ndarray, h: dict) -> np.ndarray:
        """GPT tokens of DB rows [..., 5] where ``mask``, each chunk EOD-padded to chunk_length; all EOD elsewhere.
        Returns [..., r * chunk_length] (the last two axes of ``rows`` flattened)."""
        cl = self.chunk_length
        within = np.arange(cl)
        out = np.full((*mask.shape, cl), self.eod, np.int64)
        for d in np.unique(rows[mask][:, 0]):
            sel = mask & (rows[..., 0] == d)
            r = rows[sel]
            pos = (h["doc_start"][d][r[:, 1]] + r[:, 2])[:, None] + within
            take = within < (r[:, 3] - r[:, 2])[:, None]
            block = np.full(pos.shape, self.eod, np.int64)
            block[take] = h["datasets"][d].tokens[pos[take]]
            out[sel] = block
        return out.reshape(*mask.shape[:-1], mask.shape[-1] * cl)


def _rows(path, name: str):
    """Dataset ``name`` of an HDF5 file as a read-only memmap when it is stored contiguous and unfiltered (as
    this package writes the merged DB and neighbor blocks), else the open h5py dataset; both read rows in bulk."""
    import h5py

    f = h5py.File(path, "r")
    d = f[name]
    offset = d.id.get_offset() if d.chunks is None and d.size else None
    if offset is None:
        return d
    out = np.memmap(path, mode="r", dtype=d.dtype, offset=offset, shape=d.shape)
    f.close()
    return out


def __getattr__(name: str):
    if name == "RetroDataset":
        from torch.utils.data import Dataset

        cls = type("RetroDataset", (RetroSamples, Dataset), {
            "__module__": __name__, "__doc__": "A ``torch.utils.data.Dataset`` of RETRO samples.\n\n"
                                               + (RetroSamples.__doc__ or "")})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    RetroDataset = RetroSamples  # for type checkers; at run time __getattr__ makes the torch subclass
