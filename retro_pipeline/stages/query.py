"""query-neighbors: for every chunk of every pretraining sample, its nearest train-DB chunks from other
documents (docs/formats.md §4).

Blocks are runs of one split's samples. A worker loads the built index once (memory-mapped lists where they
are on disk), cuts each sample's first ``seq_length`` tokens into chunks, embeds them, searches
``--num-neighbors-query`` ids with the tuned search settings, drops every id whose document is any document
of the chunk's own sample (numpy over the whole block), keeps the first ``--num-neighbors-save`` and pads
with -1: ``query/<split>_<hash>/<start>-<end>.hdf5``, dataset ``neighbors`` int64 [n_chunks, k], chunk ids
``start..end-1`` (sample ``i`` owns chunks ``i*L .. i*L+L-1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline import faiss_index
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, h5_create, h5_open_write
from retro_pipeline.samples import SPLITS, SampleSet
from retro_pipeline.stage import Block, Option, Resources, block_file_name, rows_per_block
from retro_pipeline.stages.embed import EMBED_OPTIONS, EmbeddingStage
from retro_pipeline.stages.index_add import NUM_NEIGHBORS_SAVE

DOC_KEY = 1 << 40  # sample-local index x DOC_KEY + global document number: one int64 per (sample, document)


class QueryNeighborsStage(EmbeddingStage):
    """Find the neighbors of every chunk of every pretraining sample (query/<split>_<hash>/ blocks).

    Samples: each split's documents (as db-build split them; test = a seeded share of the non-train ones) in
    a seeded order, cut into windows of --seq-length + 1 tokens that may cross documents, as GPT pretraining
    does; their first --seq-length tokens are the sample's chunks. A neighbor from any document of the
    chunk's own sample is dropped.
    """

    name = "query-neighbors"
    needs = ("index-add",)
    unit = "samples"
    resources = Resources(cpus=1, gpus=1, max_per_node=8)
    options = (
        Option("seq_length", int, 2048, "Tokens per pretraining sample (a multiple of --chunk-length).", minimum=1),
        Option("train_samples", int, None, "Train samples.", minimum=0, shown_default="every sample the split holds"),
        Option("eval_samples", int, None, "Samples of valid and of test each.", minimum=0,
               shown_default="every sample the split holds"),
        Option("num_neighbors_query", int, 200, "Neighbors searched per chunk before the own-sample filter.",
               minimum=1),
        NUM_NEIGHBORS_SAVE,
        *EMBED_OPTIONS,
    )

    def samples(self, split: str) -> SampleSet:
        cache = self.__dict__.setdefault("_samples", {})
        if split not in cache:
            n = self.cfg.train_samples if split == "train" else self.cfg.eval_samples
            cache[split] = SampleSet(self.workdir, self.cfg, split, n)
        return cache[split]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_samples"}

    def neighbor_dir(self, split: str) -> Path:
        return self.workdir.root / "query" / f"{split}_{self.samples(split).hash}"

    # ---- driver side
    def validate(self) -> None:
        if self.cfg.seq_length % self.cfg.chunk_length:
            raise RetroError(f"--seq-length {self.cfg.seq_length}: must be a multiple of --chunk-length "
                             f"{self.cfg.chunk_length}")
        if self.cfg.num_neighbors_save > self.cfg.num_neighbors_query:
            raise RetroError(f"--num-neighbors-save {self.cfg.num_neighbors_save} is more than --num-neighbors-query "
                             f"{self.cfg.num_neighbors_query}; query at least as many as you save")

    def prepare(self) -> None:
        dirs = {s: self.neighbor_dir(s).name for s in SPLITS if self.samples(s).n_samples}
        self.workdir.store_extra({"retro_neighbor_dirs": dirs})

    def plan(self) -> list[Block]:
        blocks = []
        for split in SPLITS:
            ss = self.samples(split)
            if not ss.n_samples:
                continue
            n_chunks = ss.n_samples * ss.L
            per = max(1, rows_per_block(n_chunks, self.cfg.block_size, floor=256) // ss.L)
            for a in range(0, ss.n_samples, per):
                b = min(a + per, ss.n_samples)
                name = block_file_name(a * ss.L, b * ss.L, n_chunks)
                blocks.append(Block(f"{split}/{name[:-5]}", a, b, str(self.neighbor_dir(split) / name),
                                    {"split": split}))
        return blocks

    def outputs(self) -> list[Path]:
        return [self.workdir.root / "query"]

    # ---- worker side
    def setup(self, resources: dict[str, Any]):
        import h5py

        from retro_pipeline.read import WorkdirReader

        state = super().setup(resources)
        reader = WorkdirReader(self.workdir)
        state["index"] = reader.index(mmap=True)
        if state["index"].d != state["encoder"].dim:
            raise RetroError(f"the index takes {state['index'].d}-dimensional vectors but the embedder gives "
                             f"{state['encoder'].dim}; rebuild the index with 'retro-pipeline index-build --force'")
        with h5py.File(self.workdir.merged_db_path("train"), "r") as f:
            ds_doc = f["chunks"][:, :2].astype(np.int64)
        from retro_pipeline.arrays import offsets

        base = offsets([len(d) for d in state["reader"].datasets])  # global document number of (ds, 0)
        state["doc_base"] = base
        state["neighbor_doc"] = base[ds_doc[:, 0]] + ds_doc[:, 1]  # global document of each train-DB row
        faiss_index.faiss().omp_set_num_threads(max(1, int(resources.get("num_cpus") or 1)))
        return state

    def process(self, block: Block, state) -> dict[str, Any]:
        ss = self.samples(block.meta["split"])
        n, L, cl = block.size, ss.L, ss.chunk_length
        tokens = ss.tokens(block.start, block.end)[:, :ss.seq_length].reshape(n * L, cl)
        bounds = np.arange(n * L + 1, dtype=np.int64) * cl
        texts = state["reader"].gpt.detokenize_flat(tokens.reshape(-1), bounds)
        emb = state["encoder"].encode(texts, batch_size=self.cfg.batch_size)
        index = state["index"]
        kq = min(self.cfg.num_neighbors_query, index.ntotal)
        _, found = index.search(np.ascontiguousarray(emb, dtype=np.float32), kq)  # [n*L, kq], -1 = none
        # the documents of each sample: a contiguous run lo..hi of the split's stream
        lo, hi = ss.doc_span(block.start, block.end)
        counts = hi - lo + 1
        local = np.repeat(np.arange(n, dtype=np.int64), counts)
        stream_pos = np.concatenate([np.arange(a, b + 1) for a, b in zip(lo, hi)])
        own_docs = state["doc_base"][ss.docs[stream_pos, 0]] + ss.docs[stream_pos, 1]
        own = np.sort(local * DOC_KEY + own_docs)
        chunk_sample = np.repeat(np.arange(n, dtype=np.int64), L)[:, None]
        valid = found >= 0
        keys = chunk_sample * DOC_KEY + state["neighbor_doc"][np.where(valid, found, 0)]
        pos = np.minimum(np.searchsorted(own, keys), len(own) - 1)
        keep = valid & (own[pos] != keys)
        k = self.cfg.num_neighbors_save
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ids first, in search order
        out = np.take_along_axis(found, order, 1)
        out[~np.take_along_axis(keep, order, 1)] = -1
        if out.shape[1] < k:
            out = np.concatenate([out, np.full((len(out), k - out.shape[1]), -1)], axis=1)
        with atomic_path(block.path) as tmp:
            with h5_open_write(tmp) as f:
                h5_create(f, "neighbors", data=out.astype(np.int64))
        return {"samples": int(n), "chunks": int(n * L), "dropped_own": int((valid & ~keep).sum()),
                "missing": int((out < 0).sum())}

    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split in SPLITS:
            rs = [results[b.name]["counts"] for b in blocks if b.meta["split"] == split]
            if rs:
                out[f"n_samples_{split}"] = sum(r["samples"] for r in rs)
                out[f"n_chunks_{split}"] = sum(r["chunks"] for r in rs)
        counts = [r["counts"] for r in results.values()]
        out["n_neighbors_missing"] = sum(c["missing"] for c in counts)
        out["n_dropped_own_sample"] = sum(c["dropped_own"] for c in counts)
        return out
