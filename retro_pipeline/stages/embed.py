"""Embedding: blocks of chunk-database rows → embeddings on disk, one file per block.

Rows of ``db/merged/<db>.hdf5`` become text through the shared GPT-tokens-to-text path
(:mod:`retro_pipeline.chunks`) and are embedded by :class:`embedder.Encoder`, loaded once per worker. Each
block is written to ``embed/<db>/<start>-<end>.hdf5`` as dataset ``data`` [n, dim] (float32 by default,
float16 with ``embed_dtype``). Workers ask Ray for a GPU when the cluster has one and use CPUs otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline.chunks import chunk_texts
from retro_pipeline.config import BuildConfig
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, h5_create, h5_open_write
from retro_pipeline.stage import Block, Stage, block_file_name, block_ranges, rows_per_block
from retro_pipeline.workdir import Workdir


def load_encoder(cfg: BuildConfig, device=None, dtype=None, num_threads=None):
    from transformers.utils import logging as hf_logging

    from embedder import Encoder

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise
    return Encoder.load(cfg.embedder_spec(), pooling=cfg.pooling or None, device=device, dtype=dtype,
                        num_threads=num_threads)


class ChunkReader:
    """Text of chunk-database rows ``(dataset_idx, doc_id, token_start, token_end, ...)``, in bulk."""

    def __init__(self, cfg: BuildConfig):
        from retro_pipeline.corpus import IndexedDataset
        from retro_pipeline.tokenizers import load_gpt_tokenizer

        self.gpt = load_gpt_tokenizer(cfg.gpt_tokenizer)
        self.datasets = [IndexedDataset(p) for _, p in cfg.blend()]

    def texts(self, rows: np.ndarray) -> list[str]:
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


class EmbedStage(Stage):
    name = "embed"
    unit = "chunks"
    num_cpus = 1.0
    num_gpus = 1.0  # used only where the cluster has GPUs

    def __init__(self, workdir: str, cfg: BuildConfig, db: str = "sampled", device: str | None = None,
                 dtype: str | None = None, batch_size: int = 128):
        self.workdir = str(workdir)
        self.cfg = cfg
        self.db = db
        self.name = f"embed-{db}"
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        if device == "cpu":
            self.num_gpus = 0.0  # don't hold a cluster's GPUs for CPU work

    @property
    def wd(self) -> Workdir:
        return Workdir(self.workdir)

    def n_rows(self) -> int:
        import h5py

        path = self.wd.merged_db_path(self.db)
        if not path.exists():
            raise RetroError(f"{path}: the chunk database is missing; run 'retro-pipeline db-build --workdir "
                             f"{self.workdir}' first")
        with h5py.File(path, "r") as f:
            return int(f["n_written"][0])

    def prepare(self) -> None:
        self.n_rows()

    def plan(self) -> list[Block]:
        n = self.n_rows()
        out = self.wd.embed_dir(self.db)
        return [Block(block_file_name(s, e, n)[:-5], s, e, str(out / block_file_name(s, e, n)))
                for s, e in block_ranges(n, rows_per_block(n, self.cfg.block_size, floor=256))]

    def output_dirs(self) -> list[Path]:
        return [self.wd.embed_dir(self.db)]

    def setup(self, resources: dict[str, Any]):
        import torch

        device = self.device
        if device is None and not resources.get("num_gpus"):
            device = "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RetroError(f"--device cuda: no CUDA device on worker {os.uname().nodename} (torch "
                             f"{torch.__version__}); use --device cpu or a GPU node with a CUDA build of torch")
        threads = max(1, int(resources.get("num_cpus") or 1))
        return {"reader": ChunkReader(self.cfg),
                "encoder": load_encoder(self.cfg, device=device, dtype=self.dtype, num_threads=threads)}

    def embed_rows(self, rows: np.ndarray, state) -> np.ndarray:
        texts = state["reader"].texts(rows)
        return state["encoder"].encode(texts, batch_size=self.batch_size)

    def process(self, block: Block, state) -> dict[str, Any]:
        import h5py

        with h5py.File(self.wd.merged_db_path(self.db), "r") as f:
            rows = f["chunks"][block.start:block.end]
        emb = self.embed_rows(rows, state).astype(self.cfg.embed_dtype, copy=False)
        with atomic_path(block.path) as tmp:
            with h5_open_write(tmp) as f:
                h5_create(f, "data", data=emb)
        return {"chunks": int(len(emb)), "dim": int(emb.shape[1])}

    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        dims = {r["counts"]["dim"] for r in results.values()}
        return {"n_chunks": sum(r["counts"]["chunks"] for r in results.values()),
                "dim": dims.pop() if len(dims) == 1 else None}


def read_embeddings(workdir: str, db: str = "sampled") -> np.ndarray:
    """All embedding blocks of ``db`` in row order, as one float32 array (for inspection and tests)."""
    import h5py

    files = sorted(Workdir(workdir).embed_dir(db).glob("*.hdf5"))
    if not files:
        raise RetroError(f"{Workdir(workdir).embed_dir(db)}: no embeddings; run 'retro-pipeline embed' first")
    parts = []
    for p in files:
        with h5py.File(p, "r") as f:
            parts.append(f["data"][...].astype(np.float32))
    return np.concatenate(parts)
