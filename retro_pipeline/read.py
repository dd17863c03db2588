"""The read side of a workdir: merged chunk DBs, chunk texts, embeddings, the index, samples and neighbors.

Stages, the CLI's summaries and tests read a finished workdir only through here; it becomes the body of
``retro.init(workdir)``. Everything opens lazily and reads in bulk.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retro_pipeline.errors import RetroError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from retro_pipeline.config import Config
    from retro_pipeline.workdir import Workdir


class ChangedInputWarning(UserWarning):
    """A workdir was read with ``allow_changed=True`` although what it was built from changed since."""


def stale_reason(workdir: "Workdir", stages: "Iterable[str]") -> tuple[str, str] | None:
    """Why the outputs of ``stages`` no longer match what they were made from, as ``retro-pipeline status``
    says it (an input file that changed or is gone, or changed settings), or None where none of them is stale.

    Returns (the first stage built from that change, the change). As cheap as ``status``: each recorded input
    file is stat'ed, and hashed only where its mtime changed.
    """
    from retro_pipeline.pipeline import status

    st = status(workdir)
    hit = [st[s]["stale"] for s in stages if st.get(s, {}).get("stale")]
    if not hit:
        return None
    first = next(name for name, v in st.items() if v.get("stale") == hit[0])  # status is in pipeline order
    return first, hit[0]


def check_built(workdir: "Workdir", stages: "Iterable[str]", allow_changed: bool = False,
                option: str = "allow_changed=True", warn: "Callable[[str], None] | None" = None) -> str | None:
    """Refuse to read the outputs of ``stages`` when ``status`` calls them stale: a one-line RetroError naming
    the change and the fix; with ``allow_changed``, ``warn`` (default: a :class:`ChangedInputWarning`) the
    same line instead and return it. ``option`` is how the caller's user allows it (``--allow-changed``)."""
    why = stale_reason(workdir, stages)
    if why is None:
        return None
    stage, change = why
    root = workdir.root
    msg = (f"{root}: {stage} is stale, made from what changed since: {change}; rebuild it with 'retro-pipeline "
           f"build --workdir {root} --force' (or restore what changed), or pass {option} to read it as it is")
    if not allow_changed:
        raise RetroError(msg)
    (warn or warn_changed)(msg)
    return msg


def warn_changed(msg: str) -> None:
    """Issue ``msg`` as a :class:`ChangedInputWarning` attributed to the first caller outside this package."""
    import os
    import sys

    here, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(1), 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(msg, ChangedInputWarning, stacklevel=level)


class ChunkReader:
    """Text of chunk-database rows ``(dataset_idx, doc_id, token_start, token_end, ...)``, in bulk."""

    def __init__(self, cfg: "Config"):
        from retro_pipeline.corpus import IndexedDataset
        from retro_pipeline.tokenizers import load_gpt_tokenizer

        self.gpt = load_gpt_tokenizer(cfg.gpt_tokenizer)
        self.datasets = [IndexedDataset(p) for _, p in cfg.blend()]

    def texts(self, rows: np.ndarray) -> list[str]:
        from retro_pipeline.chunks import chunk_texts

        rows = np.asarray(rows, dtype=np.int64)
        out: list[str] = [""] * len(rows)
        for ds_idx in np.unique(rows[:, 0]):
            sel = np.flatnonzero(rows[:, 0] == ds_idx)
            r = rows[sel]
            ds = self.datasets[int(ds_idx)]
            abs_start = np.asarray(ds.sequence_offsets, dtype=np.int64)[r[:, 1]] + r[:, 2]
            for i, t in zip(sel, chunk_texts(self.gpt, ds.tokens, abs_start, r[:, 3] - r[:, 2])):
                out[i] = t
        return out


class WorkdirReader:
    """A finished (or partly finished) workdir, for reading: ``WorkdirReader(Workdir(path))``.

    It reads what is there, as the stages do while they build; a reader for people (``retro.init``,
    ``RetroDataset``, ``inspect``) first calls :meth:`check_built`, which refuses outputs that ``status`` calls
    stale (an input file changed since, or settings).
    """

    def __init__(self, workdir: "Workdir"):
        self.workdir = workdir
        self._samples = None

    @cached_property
    def config(self) -> "Config":
        from retro_pipeline.config import resolve

        stored = self.workdir.stored()
        if not stored:
            raise RetroError(f"{self.workdir.root}: not a retro-pipeline workdir (no config.json); run "
                             f"'retro-pipeline build --workdir {self.workdir.root}' first")
        return resolve(stored, {})[0]

    def check_built(self, stages: "Iterable[str]", allow_changed: bool = False, **how) -> str | None:
        """:func:`check_built` for this workdir: call it before reading the outputs of ``stages``."""
        return check_built(self.workdir, stages, allow_changed, **how)

    @cached_property
    def chunk_reader(self) -> ChunkReader:
        return ChunkReader(self.config)

    def db_num_chunks(self, db: str) -> int:
        import h5py

        with h5py.File(self._db_path(db), "r") as f:
            return int(f["n_written"][0])

    def db_chunks(self, db: str, start: int = 0, end: int | None = None, step: int = 1) -> np.ndarray:
        """Rows ``[start:end:step]`` of ``db/merged/<db>.hdf5`` (dataset_idx, doc_id, start, end, bert_len)."""
        import h5py

        with h5py.File(self._db_path(db), "r") as f:
            return f["chunks"][start:end:step]

    def db_rows(self, db: str, rows) -> np.ndarray:
        """The chunk rows at the given (sorted, distinct) row numbers of ``db``."""
        import h5py

        rows = np.asarray(rows, dtype=np.int64)
        with h5py.File(self._db_path(db), "r") as f:
            return f["chunks"][rows] if len(rows) else np.zeros((0, f["chunks"].shape[1]), np.uint32)

    def chunk_texts(self, rows: np.ndarray) -> list[str]:
        return self.chunk_reader.texts(rows)

    def embeddings(self, db: str = "sampled") -> np.ndarray:
        """Every embedding block of ``db`` in row order, as one float32 array."""
        import h5py

        files = sorted(self.workdir.embed_dir(db).glob("*.hdf5"))
        if not files:
            raise RetroError(f"{self.workdir.embed_dir(db)}: no embeddings; run 'retro-pipeline embed-{db} "
                             f"--workdir {self.workdir.root}' first")
        parts = []
        for p in files:
            with h5py.File(p, "r") as f:
                parts.append(f["data"][...].astype(np.float32))
        return np.concatenate(parts)

    def embedding_files(self, db: str = "sampled") -> list[tuple[int, int, "Path"]]:
        """(start, end, path) of each embedding block of ``db``, in row order."""
        out = []
        for p in self.workdir.embed_dir(db).glob("*.hdf5"):
            s, _, e = p.stem.partition("-")
            out.append((int(s), int(e), p))
        if not out:
            raise RetroError(f"{self.workdir.embed_dir(db)}: no embeddings; run 'retro-pipeline embed-{db} "
                             f"--workdir {self.workdir.root}' first")
        return sorted(out)

    def embedding_rows(self, db: str, start: int, end: int) -> np.ndarray:
        """Embeddings of rows ``[start, end)`` of ``db``, as float32."""
        import h5py

        parts = []
        for s, e, p in self.embedding_files(db):
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                with h5py.File(p, "r") as f:
                    parts.append(f["data"][lo - s:hi - s].astype(np.float32))
        dim = self.embedding_dim(db)
        out = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        if len(out) != end - start:
            raise RetroError(f"{self.workdir.embed_dir(db)}: rows {start}..{end} are not all there; rerun "
                             f"'retro-pipeline embed-{db} --workdir {self.workdir.root}'")
        return out

    def embedding_dim(self, db: str = "sampled") -> int:
        import h5py

        with h5py.File(self.embedding_files(db)[0][2], "r") as f:
            return int(f["data"].shape[1])

    def sampled_train_rows(self) -> np.ndarray:
        """For each row of the sampled DB, its row in the train DB (sorted, as db-build writes them)."""
        import h5py

        with h5py.File(self._db_path("sampled"), "r") as f:
            return f["train_rows"][...].astype(np.int64)

    def index_info(self) -> dict:
        """What index-train chose: ``index_str`` (``auto`` resolved), ``dim``, the metric."""
        from retro_pipeline.io import read_json

        info = read_json(self.workdir.index_info_path)
        if info is None:
            raise RetroError(f"{self.workdir.index_info_path}: missing; run 'retro-pipeline index-train --workdir "
                             f"{self.workdir.root}' first")
        return info

    def queries(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed query set of recall measurements: (DB rows [n, 2] = (db 0 valid / 1 train, row), embeddings)."""
        import h5py

        path = self.workdir.queries_path(self.index_info()["index_str"])
        with h5py.File(path, "r") as f:
            return f["rows"][...].astype(np.int64), f["data"][...].astype(np.float32)

    def search_params(self) -> dict:
        from retro_pipeline.io import read_json

        path = self.workdir.search_params_path(self.index_info()["index_str"])
        out = read_json(path)
        if out is None:
            raise RetroError(f"{path}: missing; run 'retro-pipeline index-add --workdir {self.workdir.root}' first")
        return out

    def index(self, mmap: bool = False):
        """The built index (all train chunks added), with the tuned search parameters set: one faiss index, or a
        :class:`retro_pipeline.faiss_index.ShardedIndex` of the shards ``shards.json`` lists."""
        from retro_pipeline import faiss_index

        index_str = self.index_info()["index_str"]
        listed = self.shards()
        if listed is None:
            index = faiss_index.read_index(self.workdir.added_index_path(index_str), "index", mmap=mmap)
        else:   # --index-shards: every shard, searched as one (faiss_index.ShardedIndex)
            index = faiss_index.ShardedIndex([
                faiss_index.read_index(self.workdir.shards_dir(index_str) / sh["file"], "index shard", mmap=mmap)
                for sh in listed["shards"]], [sh["first_row"] for sh in listed["shards"]])
        faiss_index.set_search_params(index, self.search_params()["params"])
        return index

    def shards(self) -> dict | None:
        """``shards.json`` of an index cut into shards (--index-shards): ``n_shards``, ``metric_type`` and per
        shard its ``file``, ``first_row``, ``end_row`` and ``ntotal``; None for one whole index."""
        from retro_pipeline.io import read_json

        index_str = self.index_info()["index_str"]
        listed = read_json(self.workdir.shards_path(index_str))
        for sh in (listed or {}).get("shards", ()):
            path = self.workdir.shards_dir(index_str) / sh["file"]
            if not path.exists():
                raise RetroError(f"{path}: this index shard is missing; merge it again with 'retro-pipeline "
                                 f"index-add --workdir {self.workdir.root}' (the other shards are kept)")
        return listed

    def db_infos(self) -> list[dict]:
        """``db/indexed_dataset_infos.json``: per corpus its ratio, prefix, document and chunk counts."""
        from retro_pipeline.io import read_json

        infos = read_json(self.workdir.infos_path)
        if infos is None:
            raise RetroError(f"{self.workdir.infos_path}: missing; run 'retro-pipeline db-build --workdir "
                             f"{self.workdir.root}' first")
        return infos

    def samples(self, split: str):
        """The pretraining samples of ``split`` that query-neighbors used."""
        from retro_pipeline.samples import split_samples

        self._check_split(split)
        if self._samples is None:
            self._samples = split_samples(self.config)
        return self._samples[split]

    def neighbor_files(self, split: str) -> list[tuple[int, int, Path]]:
        """(first chunk, end chunk, path) of each neighbor block of ``split``, in chunk order; an error unless
        query-neighbors has finished and the split has samples."""
        self._check_split(split)
        root = self.workdir.root
        if self.workdir.stage_status("query-neighbors")["state"] != "done":
            raise RetroError(f"{root}: no neighbors yet (query-neighbors has not finished); run 'retro-pipeline "
                             f"query-neighbors --workdir {root}' first")
        dirs = self.workdir.stored().get("retro_neighbor_dirs") or {}
        if not dirs.get(split):
            raise RetroError(f"{root}: the {split} split has zero width by --split {self.config.split}, so it has no "
                             f"samples and no neighbors")
        out = []
        for p in (root / "query" / dirs[split]).glob("*.hdf5"):
            s, _, e = p.stem.partition("-")
            out.append((int(s), int(e), p))
        return sorted(out)

    def neighbors(self, split: str) -> np.ndarray:
        """Saved neighbor rows of every chunk of ``split``'s samples: int64 [n_chunks, num_neighbors_save]."""
        import h5py

        parts = []
        for _, _, p in self.neighbor_files(split):
            with h5py.File(p, "r") as f:
                parts.append(f["neighbors"][...])
        return np.concatenate(parts) if parts else np.zeros((0, self.config.num_neighbors_save), np.int64)

    def _check_split(self, split: str) -> None:
        from retro_pipeline.samples import SPLITS

        if split not in SPLITS:
            raise RetroError(f"{self.workdir.root}: unknown split {split!r}; use one of {', '.join(SPLITS)}")

    def _db_path(self, db: str):
        path = self.workdir.merged_db_path(db)
        if not path.exists():
            raise RetroError(f"{path}: the chunk database is missing; run 'retro-pipeline db-build --workdir "
                             f"{self.workdir.root}' first")
        return path


def read_embeddings(workdir, db: str = "sampled") -> np.ndarray:
    """All embedding blocks of ``db`` in a workdir (a path or :class:`Workdir`), as one float32 array."""
    from retro_pipeline.workdir import Workdir

    return WorkdirReader(workdir if isinstance(workdir, Workdir) else Workdir(workdir)).embeddings(db)
