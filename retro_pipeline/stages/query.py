"""query-neighbors: for every chunk of every pretraining sample, its nearest train-DB chunks from other
documents (docs/formats.md §4).

The samples are the ones Megatron's RETRO training reads (:mod:`retro_pipeline.samples`), as many as its
``--train-samples``, ``--eval-interval``, ``--eval-iters`` and ``--global-batch-size`` make it ask. Blocks are
runs of one split's chunk rows, ``retro_block_size`` rows each (the last of a split fewer), so that Megatron
finds chunk ``c`` in the file starting at ``c // retro_block_size * retro_block_size``. A worker loads the
built index once (memory-mapped lists where they are on disk), cuts the samples' first ``seq_length`` tokens
into chunks, embeds them, searches ``--num-neighbors-query`` ids with the tuned search settings, drops every
id whose document is any document of the chunk's own sample (numpy over the whole block), keeps the first
``--num-neighbors-save`` and pads with -1: ``query/<split>_<hash>/<start>-<end>.hdf5``, dataset ``neighbors``
int64 [n_chunks, k] (sample ``i`` owns chunks ``i*L .. i*L+L-1``). The stage writes config.json's keys for
Megatron (:mod:`retro_pipeline.megatron`) when it starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline import faiss_index
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, h5_create, h5_open_write
from retro_pipeline.samples import SPLITS, SampleSet, eval_iters, split_samples
from retro_pipeline.stage import Block, Option, Resources, Service, block_file_name, rows_per_block
from retro_pipeline.stages.embed import EMBED_OPTIONS, EmbeddingStage
from retro_pipeline.stages.index_add import NUM_NEIGHBORS_SAVE

log = logging.getLogger(__name__)

def normalize_eval_iters(value) -> str | int:
    text = str(value).strip()
    if text == "auto":
        return text
    if not text.isdigit():
        raise RetroError(f"--eval-iters {value!r}: give a number of evaluation batches (0 for none) or 'auto'")
    return int(text)


DOC_KEY = 1 << 40  # sample-local index x DOC_KEY + global document number: one int64 per (sample, document)


class QueryNeighborsStage(EmbeddingStage):
    """Find the neighbors of every chunk of every pretraining sample (query/<split>_<hash>/ blocks).

    Samples are Megatron's (megatron-core 0.13.1 MultiSplitGPTDataset / BlendedDataset with this build's
    blend, --split, --seed and --seq-length), as many as Megatron's training asks: --train-samples of train;
    (train_samples // global_batch_size // eval_interval + 1) * eval_iters * global_batch_size of valid;
    eval_iters * global_batch_size of test. Their first --seq-length tokens are their chunks. A neighbor from
    any document of the chunk's own sample is dropped. config.json gets every key Megatron-LM's
    load_retro_args reads. --eval-iters auto is 50, lowered to the most evaluations one epoch of the valid
    split fills (0 for a corpus whose valid split holds less than one --global-batch-size of samples).
    """

    name = "query-neighbors"
    needs = ("index-add",)
    unit = "chunks"
    resources = Resources(cpus=1, gpus=1, max_per_node=8)
    options = (
        Option("seq_length", int, 2048, "Tokens per pretraining sample (a multiple of --chunk-length).", minimum=1),
        Option("train_samples", int, None, "Train samples (Megatron's --train-samples).", minimum=1,
               shown_default="one epoch of the train split"),
        Option("global_batch_size", int, 256, "Megatron's --global-batch-size: sizes the valid and test sample "
               "counts, and Megatron's training takes it from config.json.", minimum=1),
        Option("eval_interval", int, 2000, "Megatron's --eval-interval (iterations between evaluations).",
               minimum=1),
        Option("eval_iters", str, "auto", "Megatron's --eval-iters (batches per evaluation; 0: no evaluation, "
               "no valid or test samples), or auto: 50, lowered to what one epoch of the valid split fills.",
               normalize=normalize_eval_iters),
        Option("num_neighbors_query", int, 200, "Neighbors searched per chunk before the own-sample filter.",
               minimum=1),
        NUM_NEIGHBORS_SAVE,
        *EMBED_OPTIONS,
    )

    def samples(self, split: str) -> SampleSet:
        if "_samples" not in self.__dict__:
            self._samples = split_samples(self.cfg)
        return self._samples[split]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_samples"}

    def neighbor_dir(self, split: str) -> Path:
        return self.workdir.root / "query" / f"{split}_{self.samples(split).hash}"

    def counts_text(self) -> str:
        """The samples Megatron's training will ask, as the build reports them before it queries."""
        parts = []
        for s in SPLITS:
            ss = self.samples(s)
            if not ss.exists:
                parts.append(f"{s} none (zero width by --split {self.cfg.split})")
                continue
            epoch = ss.one_epoch()
            parts.append(f"{s} {ss.n_samples:,} samples"
                         + (f" ({ss.n_samples / epoch:.1f} epochs)" if epoch and ss.n_samples else ""))
        iters = eval_iters(self.cfg)
        how = f"--eval-iters {iters}" + (" (auto: what one epoch of the valid split fills; give a number to ask "
                                         "more)" if self.cfg.eval_iters == "auto" else "")
        return (f"Megatron's training samples: {', '.join(parts)}; --global-batch-size {self.cfg.global_batch_size}, "
                f"--eval-interval {self.cfg.eval_interval}, {how}")

    def block_rows(self) -> int:
        """retro_block_size: chunk rows per query file, one value for every split."""
        total = sum(self.samples(s).n_samples * self.samples(s).L for s in SPLITS)
        return rows_per_block(total, self.cfg.block_size, floor=256)

    # ---- driver side
    def validate(self) -> None:
        if self.cfg.seq_length % self.cfg.chunk_length:
            raise RetroError(f"--seq-length {self.cfg.seq_length}: must be a multiple of --chunk-length "
                             f"{self.cfg.chunk_length}")
        if self.cfg.num_neighbors_save > self.cfg.num_neighbors_query:
            raise RetroError(f"--num-neighbors-save {self.cfg.num_neighbors_save} is more than --num-neighbors-query "
                             f"{self.cfg.num_neighbors_query}; query at least as many as you save")
        if self.cfg.data_path and all(Path(p + ".idx").is_file() for p in self.cfg.data_path[1::2]):
            for s in SPLITS:  # every sample-count check, before any stage embeds
                self.samples(s)

    def prepare(self) -> None:
        from retro_pipeline.megatron import megatron_config

        for s in SPLITS:
            ss = self.samples(s)
            if not ss.exists:
                continue
            self.neighbor_dir(s).mkdir(parents=True, exist_ok=True)  # Megatron opens it even when it is empty
            empty = [d.prefix for d, (b, e) in zip(ss.datasets, ss.doc_ranges) if e == b]
            if empty:
                log.warning("%s: the %s split holds none of its documents by --split %s, and Megatron's training "
                            "cannot build an empty split (megatron-core 0.13.1's GPTDataset loops forever); change "
                            "--split so that the split has documents or zero width", empty[0], s, self.cfg.split)
        self.write_train_documents()
        log.info("query-neighbors: %s", self.counts_text())
        dirs = {s: (self.neighbor_dir(s).name if self.samples(s).exists else None) for s in SPLITS}
        self.workdir.store_extra(megatron_config(self.workdir, self.cfg, {
            "train_samples": self.samples("train").n_samples, "eval_iters": eval_iters(self.cfg),
            "block_size": self.block_rows(), "neighbor_dirs": dirs}))

    def write_train_documents(self, rows_per_read: int = 1 << 20) -> None:
        """``train_documents.npy`` (:attr:`Workdir.train_documents_path`), streamed from the train DB a slice at
        a time and written atomically, unless a whole one is there."""
        import h5py

        from retro_pipeline.arrays import offsets
        from retro_pipeline.read import WorkdirReader

        path = self.workdir.train_documents_path
        reader = WorkdirReader(self.workdir)
        n = reader.db_num_chunks("train")
        if path.exists():
            try:
                if np.load(path, mmap_mode="r").shape == (n,):
                    return
            except ValueError:   # not a whole .npy (written atomically, so only a foreign file)
                pass
        base = offsets([d["n_docs"] for d in reader.db_infos()])
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n,))
            with h5py.File(self.workdir.merged_db_path("train"), "r") as f:
                chunks = f["chunks"]
                for s in range(0, n, rows_per_read):
                    ds_doc = chunks[s:min(s + rows_per_read, n), :2].astype(np.int64)
                    out[s:s + len(ds_doc)] = base[ds_doc[:, 0]] + ds_doc[:, 1]
            out.flush()
            del out

    def plan(self) -> list[Block]:
        blocks = []
        per = self.block_rows()
        for split in SPLITS:
            ss = self.samples(split)
            n_chunks = ss.n_samples * ss.L
            for a in range(0, n_chunks, per):
                b = min(a + per, n_chunks)
                name = block_file_name(a, b, n_chunks)
                blocks.append(Block(f"{split}/{name[:-5]}", a, b, str(self.neighbor_dir(split) / name),
                                    {"split": split}))
        return blocks

    def outputs(self) -> list[Path]:
        return [self.workdir.root / "query", self.workdir.root / "megatron"]

    # ---- worker side
    def setup(self, resources: dict[str, Any]):
        import h5py

        from retro_pipeline.read import WorkdirReader

        state = super().setup(resources)
        reader = WorkdirReader(self.workdir)
        if self.service_handles:   # --index-shards on Ray: each shard searched by its own service
            listed = reader.shards()
            trained = faiss_index.read_index(self.workdir.empty_index_path(listed["index_str"]), "trained index")
            faiss_index.set_search_params(trained, reader.search_params()["params"])
            state["index"] = faiss_index.RemoteShards(self.service_handles, reader.index_info()["dim"],
                                                      sum(sh["ntotal"] for sh in listed["shards"]),
                                                      listed["metric_type"], trained)   # lists assigned here
        else:
            state["index"] = reader.index(mmap=True)
        if state["index"].d != state["encoder"].dim:
            raise RetroError(f"the index takes {state['index'].d}-dimensional vectors but the embedder gives "
                             f"{state['encoder'].dim}; rebuild the index with 'retro-pipeline index-build --force'")
        from retro_pipeline.arrays import offsets

        state["doc_base"] = offsets([len(d) for d in state["reader"].datasets])  # global document of (ds, 0)
        # the global document of each train-DB row, memory-mapped: a worker's memory does not grow with the DB
        state["neighbor_doc"] = np.load(self.workdir.train_documents_path, mmap_mode="r")
        faiss_index.faiss().omp_set_num_threads(max(1, int(resources.get("num_cpus") or 1)))
        return state

    def services(self) -> list[Service]:
        """With a sharded index (--index-shards): one searcher per shard, each holding its shard in memory on a
        node that has room for it, so that no worker loads the whole index. Where the cluster cannot hold them
        all (one node, shards cut to fit --index-memory each), the workers search the shards memory-mapped."""
        from retro_pipeline.read import WorkdirReader

        reader = WorkdirReader(self.workdir)
        index_str = reader.index_info()["index_str"]
        listed = reader.shards()
        if listed is None or listed["n_shards"] < 2:
            return []
        params = reader.search_params()["params"]
        out = []
        for i, sh in enumerate(listed["shards"]):
            path = self.workdir.shards_dir(index_str) / sh["file"]
            out.append(Service(f"shard {i + 1} of {listed['n_shards']}", faiss_index.ShardSearcher,
                               (str(path), params, sh["first_row"]), memory=int(path.stat().st_size * 1.25) + (64 << 20),
                               optional=True))   # else each worker searches every shard memory-mapped
        return out

    def texts(self, block: Block, state) -> list[str]:
        ss = self.samples(block.meta["split"])
        L, cl = ss.L, ss.chunk_length
        first, last = block.start // L, -(-block.end // L)  # the samples whose chunks the block holds
        rows = slice(block.start - first * L, block.end - first * L)
        tokens = ss.tokens(first, last)[:, :ss.seq_length].reshape(-1, cl)[rows]
        bounds = np.arange(len(tokens) + 1, dtype=np.int64) * cl
        return state["reader"].gpt.detokenize_flat(tokens.reshape(-1), bounds)

    def write(self, block: Block, state, emb: np.ndarray) -> dict[str, Any]:
        ss = self.samples(block.meta["split"])
        L = ss.L
        first, last = block.start // L, -(-block.end // L)
        n = len(emb)
        index = state["index"]
        kq = min(self.cfg.num_neighbors_query, index.ntotal)
        _, found = faiss_index.search(index, emb, kq)  # [n*L, kq], -1 = none; ties by id, sharded or not
        # the documents of each sample (a contiguous run of its corpus's document index), as sorted keys
        sample, corpus, doc = ss.doc_runs(first, last)
        own = np.sort(sample * DOC_KEY + state["doc_base"][corpus] + doc)
        chunk_sample = (np.arange(block.start, block.end, dtype=np.int64) // L - first)[:, None]
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
        return {"chunks": int(n), "dropped_own": int((valid & ~keep).sum()),
                "missing": int((out < 0).sum()), "shard_services": len(getattr(index, "handles", ()))}

    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split in SPLITS:
            ss = self.samples(split)
            if ss.exists:
                out[f"n_samples_{split}"] = ss.n_samples
                out[f"n_chunks_{split}"] = sum(results[b.name]["counts"]["chunks"] for b in blocks
                                               if b.meta["split"] == split)
        counts = [r["counts"] for r in results.values()]
        out["n_neighbors_missing"] = sum(c["missing"] for c in counts)
        # blocks whose search went to the shard services (--index-shards on Ray), not to the worker's own copy
        out["n_blocks_searched_by_shard_services"] = sum(1 for c in counts if c.get("shard_services"))
        out["n_dropped_own_sample"] = sum(c["dropped_own"] for c in counts)
        return out
