"""embed-sampled: the index-training sample's chunks → embeddings on disk, one file per block.

Rows of ``db/merged/sampled.hdf5`` become text through the shared GPT-tokens-to-text path
(:class:`retro_pipeline.read.ChunkReader`) and are embedded by :class:`embedder.Encoder`, loaded once per
worker. Each block is written to ``embed/sampled/<start>-<end>.hdf5`` as dataset ``data`` [n, dim]
(float32 by default, float16 with ``embed_dtype``). Workers ask Ray for a GPU when the cluster has one and
use CPUs otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from embedder.settings import DTYPE_NAMES, POOLINGS
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, h5_create, h5_open_write
from retro_pipeline.stage import Block, Option, Resources, Stage, block_file_name, block_ranges, rows_per_block


def load_encoder(cfg, device=None, dtype=None, num_threads=None):
    from transformers.utils import logging as hf_logging

    from embedder import Encoder

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise
    return Encoder.load(cfg.embedder_spec(), pooling=cfg.pooling or None, device=device, dtype=dtype,
                        num_threads=num_threads)


def embedding_state(cfg, resources: dict[str, Any]) -> dict[str, Any]:
    """A worker's chunk reader and encoder (every stage that embeds chunks uses this): on the GPU when the
    worker holds one or --device cuda says so, else on the worker's CPUs."""
    import torch

    from retro_pipeline.read import ChunkReader

    device = cfg.device
    if device is None and not resources.get("num_gpus"):
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RetroError(f"--device cuda: no CUDA device on worker {os.uname().nodename} (torch "
                         f"{torch.__version__}); use --device cpu or a GPU node with a CUDA build of torch")
    threads = max(1, int(resources.get("num_cpus") or 1))
    return {"reader": ChunkReader(cfg),
            "encoder": load_encoder(cfg, device=device, dtype=cfg.dtype, num_threads=threads)}


def embed_texts(cfg, texts: list[str], state) -> np.ndarray:
    """Embeddings (float32 [n, dim]) of ``texts``, length-sorted as one pool."""
    if len(texts) == 0:
        return np.zeros((0, state["encoder"].dim), np.float32)
    return state["encoder"].encode(texts, batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens)


def pool_groups(blocks: list[Block], pool: int) -> list[list[Block]]:
    """Consecutive blocks grouped into about ``sum(rows) / pool`` groups of even row counts (a block larger
    than that is a group of its own): a pure function of the plan and ``pool``."""
    total = sum(b.size for b in blocks)
    n_groups = max(1, round(total / max(1, pool)))
    groups: list[list[Block]] = []
    acc = 0
    for b in blocks:
        if not groups or acc >= len(groups) * total / n_groups:
            groups.append([])
        groups[-1].append(b)
        acc += b.size
    return groups


# How to embed (never changes outputs beyond the device's precision): every stage that embeds chunks shares
# these declarations, so each of its CLI commands has them.
EMBED_OPTIONS = (
    Option("device", str, None, "Embedding device.", changes_output=False, choices=("cpu", "cuda"),
           shown_default="cuda when present"),
    Option("dtype", str, None, "Embedding precision.", changes_output=False, choices=DTYPE_NAMES,
           shown_default="float16 on cuda, float32 on cpu"),
    Option("batch_tokens", int, None, "Padded tokens per encoder batch (texts are padded to a multiple of 8 of "
           "their own length and batched by that width).", changes_output=False, minimum=1,
           shown_default="1024 on cpu, 32768 on cuda"),
    Option("batch_size", int, None, "At most this many texts per encoder batch.", changes_output=False,
           minimum=1, shown_default="no cap: --batch-tokens decides"),
    Option("embed_pool", int, 256, "Chunks a worker embeds as one length-sorted pool: consecutive blocks are "
           "grouped to about this many (a block larger than that alone), whatever --block-size cuts; larger "
           "pools fill batches of one width better, smaller ones spread over more workers.",
           changes_output=False, minimum=1),
)


class EmbeddingStage(Stage):
    """Base of stages whose workers embed chunks: a GPU per worker where the cluster has GPUs (none with
    --device cpu), and the shared embedding options."""

    resources = Resources(cpus=1, gpus=1)  # the GPU only where the cluster has GPUs

    def __init__(self, workdir, cfg, **kw):
        super().__init__(workdir, cfg, **kw)
        if cfg.device == "cpu":
            self.gpus = 0.0  # don't hold a cluster's GPUs for CPU work

    def setup(self, resources: dict[str, Any]):
        return embedding_state(self.cfg, resources)

    def run_record(self, state) -> dict[str, Any]:
        import torch

        enc = state["encoder"]
        out = {"device": enc.device.type, "dtype": str(enc.compute_dtype).removeprefix("torch."),
               "batch_tokens": int(self.cfg.batch_tokens or enc.default_batch_tokens()),
               "batch_size": self.cfg.batch_size, "embed_pool": int(self.cfg.embed_pool)}
        if enc.device.type == "cpu":   # CPU float sums depend on the thread count for some batches
            out["threads"] = int(torch.get_num_threads())
        return out

    # ---- blocks in pools: the texts of a group's blocks are embedded as one length-sorted pool, so that a
    # batch pads little whatever the block size; each block is then written from its share
    def groups(self, blocks: list[Block]) -> list[list[Block]]:
        return pool_groups(blocks, self.cfg.embed_pool)

    def texts(self, block: Block, state) -> list[str]:
        """The texts block ``block`` embeds (any number, in the order :meth:`write` takes them)."""
        raise NotImplementedError

    def write(self, block: Block, state, emb: np.ndarray) -> dict[str, Any]:
        """Write block ``block``'s files from the embeddings (float32 [n, dim]) of its :meth:`texts`; return
        its counts."""
        raise NotImplementedError

    def process(self, block: Block, state) -> dict[str, Any]:
        return self.process_group([block], state)[0]

    def process_group(self, blocks: list[Block], state, todo: list[Block] | None = None) -> list[dict[str, Any]]:
        texts = [self.texts(b, state) for b in blocks]
        emb = embed_texts(self.cfg, [t for ts in texts for t in ts], state)  # the whole pool, as planned
        names = None if todo is None else {b.name for b in todo}
        out, pos = [], 0
        for b, ts in zip(blocks, texts):
            if names is None or b.name in names:
                out.append(self.write(b, state, emb[pos:pos + len(ts)]))
            pos += len(ts)
        return out


class EmbedSampledStage(EmbeddingStage):
    """Embed the index-training sample (db/merged/sampled.hdf5) into embed/sampled/ blocks.

    Uses the --embedder given to db-build; on GPU workers where the cluster has GPUs, else on CPUs.
    """

    name = "embed-sampled"
    needs = ("db-build",)
    unit = "chunks"
    db = "sampled"
    options = (
        Option("pooling", str, "", "Embedding pooling.", choices=POOLINGS, shown_default="the model's own, else mean"),
        Option("embed_dtype", str, "float32", "On-disk dtype of the stored embeddings.",
               choices=("float32", "float16")),
        *EMBED_OPTIONS,
    )

    def n_rows(self) -> int:
        from retro_pipeline.read import WorkdirReader

        return WorkdirReader(self.workdir).db_num_chunks(self.db)

    def prepare(self) -> None:
        self.n_rows()

    def plan(self) -> list[Block]:
        n = self.n_rows()
        out = self.workdir.embed_dir(self.db)
        return [Block(block_file_name(s, e, n)[:-5], s, e, str(out / block_file_name(s, e, n)))
                for s, e in block_ranges(n, rows_per_block(n, self.cfg.block_size, floor=256))]

    def outputs(self) -> list[Path]:
        return [self.workdir.embed_dir(self.db)]

    def input_files(self) -> list[Path]:
        from retro_pipeline.fingerprints import model_files

        return model_files(self.cfg.embedder_spec(), "embedder")

    def texts(self, block: Block, state) -> list[str]:
        from retro_pipeline.read import WorkdirReader

        return state["reader"].texts(WorkdirReader(self.workdir).db_chunks(self.db, block.start, block.end))

    def write(self, block: Block, state, emb: np.ndarray) -> dict[str, Any]:
        emb = emb.astype(self.cfg.embed_dtype, copy=False)
        with atomic_path(block.path) as tmp:
            with h5_open_write(tmp) as f:
                h5_create(f, "data", data=emb)
        return {"chunks": int(len(emb)), "dim": int(emb.shape[1])}

    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        dims = {r["counts"]["dim"] for r in results.values()}
        return {"n_chunks": sum(r["counts"]["chunks"] for r in results.values()),
                "dim": dims.pop() if len(dims) == 1 else None}
