"""index-train: the sampled chunks' embeddings → a trained, empty faiss index (docs/formats.md §3).

The index string (``--index-str``, or ``auto`` from the train-DB size and ``--index-memory``) is resolved once,
on the first run, and recorded in ``index/index.json``; a resumed run on another machine keeps it. One block
embeds the fixed query set of the recall measurements (``--num-queries`` valid-DB chunks, seeded; train
chunks where the valid DB is empty). Training is the stage's one-off job: a worker with every CPU of a node
(faiss's OpenMP threads = that worker's CPUs) and a GPU for IVF k-means where faiss has GPUs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline import faiss_index
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, failpoint, h5_create, h5_open_write, read_json, write_json
from retro_pipeline.stage import Block, Option, Resources
from retro_pipeline.stages.embed import EMBED_OPTIONS, EmbeddingStage

log = logging.getLogger(__name__)


class IndexTrainStage(EmbeddingStage):
    """Train the faiss index on the sampled chunks' embeddings (index/faiss-par-add/<index_str>/empty_1.000.faissindex).

    --index-str takes any faiss.index_factory string that can take precomputed codes (Flat, SQ8, PQ, IVF with
    any of them, an HNSW quantiser, OPQ, fast-scan), or auto: Flat for small DBs, IVF with about 8·sqrt(N)
    lists (an HNSW quantiser past 1M chunks) for larger ones, and the most accurate codes (full vectors, SQ8,
    then PQ) whose size for every train chunk fits --index-memory. Training uses every CPU of one node.
    """

    name = "index-train"
    needs = ("embed-sampled",)
    group = "index-build"
    unit = "queries"
    # the query block, the stage's only one: embedding on every CPU of a node (a 1-CPU worker left the rest idle)
    resources = Resources(cpus=1, gpus=1, whole_node=True)
    once_resources = Resources(gpus=1, whole_node=True)  # training: every CPU of a node, k-means on its GPU
    options = (
        Option("index_str", str, "auto", "faiss.index_factory string of the index, or auto."),
        Option("index_memory", str, "auto", "Bytes the index codes may take (e.g. 64G), for --index-str auto.",
               normalize=faiss_index.parse_memory, shown_default="half of this machine's RAM"),
        Option("num_queries", int, 1000, "Valid-DB chunks of the fixed query set that recall is measured on.",
               minimum=1),
        *EMBED_OPTIONS,
    )

    # ---- driver side
    def info(self) -> dict[str, Any]:
        """The recorded choice (index/index.json), made on the first call."""
        info = read_json(self.workdir.index_info_path)
        if info is not None and self.cfg.index_str in ("auto", info.get("index_str")):
            return info
        from retro_pipeline.read import WorkdirReader

        reader = WorkdirReader(self.workdir)
        dim = reader.embedding_dim("sampled")
        n_train = reader.db_num_chunks("train")
        index_str = self.cfg.index_str
        if index_str == "auto":
            index_str = faiss_index.auto_index_str(n_train, dim, faiss_index.memory_budget(self.cfg.index_memory))
            log.info("index-train: --index-str auto chose %s for %d chunks of dimension %d", index_str, n_train, dim)
        index = faiss_index.check_index_str(index_str, dim)
        n_valid = reader.db_num_chunks("valid")
        info = {"index_str": index_str, "dim": dim, "metric": "ip" if index.metric_type == 0 else "l2",
                "n_chunks_train": n_train, "queries_from": "valid" if n_valid else "train",
                "n_queries": min(self.cfg.num_queries, n_valid or n_train)}
        write_json(self.workdir.index_info_path, info)
        return info

    def validate(self) -> None:
        """A given --index-str must parse for the embeddings' dimension and be trainable on the sampled chunks
        (faiss's rules: a vector per IVF list, a codebook's entries for PQ), checked where those stay."""
        if self.cfg.index_str == "auto" or not self.workdir.embed_dir("sampled").exists() or \
                self.rebuilding & {"db-build", "embed-sampled"}:
            return
        from retro_pipeline.read import WorkdirReader

        reader = WorkdirReader(self.workdir)
        index = faiss_index.check_index_str(self.cfg.index_str, reader.embedding_dim("sampled"))
        if self.workdir.merged_db_path("sampled").exists():
            faiss_index.check_training_size(index, reader.db_num_chunks("sampled"))

    def prepare(self) -> None:
        info = self.info()
        faiss_index.check_index_str(info["index_str"], info["dim"])

    def plan(self) -> list[Block]:
        info = self.info()
        return [Block("queries", 0, info["n_queries"], str(self.workdir.queries_path(info["index_str"])),
                      {"db": info["queries_from"]})]

    def outputs(self) -> list[Path]:
        return [self.workdir.index_root]

    def bar_label(self) -> str:
        return "index-train: embedding the recall queries"

    def finalize_note(self) -> str | None:
        info = self.info()
        return f"training {info['index_str']} on the sampled chunks' embeddings (one job on a whole node)"

    def final_outputs(self) -> list[Path]:
        info = read_json(self.workdir.index_info_path)
        return [self.workdir.index_info_path] + ([self.workdir.empty_index_path(info["index_str"])] if info else [])

    # ---- worker side
    def picked(self, block: Block) -> np.ndarray:
        """The query set: a seeded choice of rows of the block's DB, in row order."""
        from retro_pipeline.read import WorkdirReader

        n = WorkdirReader(self.workdir).db_num_chunks(block.meta["db"])
        return np.sort(np.random.default_rng([self.cfg.seed, 3]).choice(n, size=block.size, replace=False))

    def texts(self, block: Block, state) -> list[str]:
        from retro_pipeline.read import WorkdirReader

        return state["reader"].texts(WorkdirReader(self.workdir).db_rows(block.meta["db"], self.picked(block)))

    def write(self, block: Block, state, emb: np.ndarray) -> dict[str, Any]:
        db, picked = block.meta["db"], self.picked(block)
        emb = emb.astype(np.float32, copy=False)
        with atomic_path(block.path) as tmp:
            with h5_open_write(tmp) as f:
                h5_create(f, "data", data=emb)
                h5_create(f, "rows", data=np.stack([np.full(len(picked), 0 if db == "valid" else 1), picked],
                                                   axis=1).astype(np.int64))
        return {"queries": int(len(emb))}

    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        from retro_pipeline.read import WorkdirReader

        info = self.info()
        x = WorkdirReader(self.workdir).embeddings("sampled")
        if x.shape[1] != info["dim"]:
            raise RetroError(f"{self.workdir.embed_dir('sampled')}: embeddings of dimension {x.shape[1]}, but "
                             f"{self.workdir.index_info_path} records {info['dim']}; rebuild with --force")
        t0 = time.perf_counter()
        index = faiss_index.train(info["index_str"], x, log)
        seconds = time.perf_counter() - t0
        failpoint("index-train:trained")
        faiss_index.write_index(index, self.workdir.empty_index_path(info["index_str"]))
        return {"index_str": info["index_str"], "n_train_vectors": int(len(x)), "dim": info["dim"],
                "train_seconds": round(seconds, 3), "threads": faiss_index.threads()}
