"""index-add: every train chunk, embedded once, encoded and added to the trained index (docs/formats.md §3).

Blocks are train-DB row ranges. A worker embeds a block's chunks, except those of the index-training sample,
whose embeddings embed-sampled already wrote (``sampled.hdf5`` maps them with ``train_rows``): no chunk is
embedded twice in a build. It writes the block's ``sa_encode`` codes (``add_codes/<s>-<e>.hdf5``, dataset
``data`` uint8 [n, code_size]) and the exact top-k of the fixed query set within the block
(``add_truth/<s>-<e>.hdf5``), so the ground truth of the recall measurement is accumulated while the float
embeddings are in memory and no float copy of the DB is ever kept.

The merge is the stage's one-off job: the codes go into the empty index in row order with ids = train-DB
rows, the per-block top-k lists are merged into the exact top-k over the whole DB, and the search settings
(``nprobe`` with IVF, ``efSearch`` with HNSW) are tuned to the cheapest that reaches ``--target-recall``;
the setting and the whole recall / queries-per-second table go in ``search.json`` beside the index.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline import faiss_index
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, failpoint, h5_create, h5_open_write, write_json
from retro_pipeline.stage import Block, Option, Resources, block_file_name, block_ranges, rows_per_block
from retro_pipeline.stages.embed import EMBED_OPTIONS, EmbeddingStage

log = logging.getLogger(__name__)


def auto_or_positive(flag: str):
    def normalize(value) -> str:
        text = str(value).strip()
        if text != "auto" and not (text.isdigit() and int(text) > 0):
            raise RetroError(f"{flag} {value!r}: give a positive integer or 'auto'")
        return text
    return normalize


def auto_or_count(flag: str):
    """'auto', or the positive integer given (as an int)."""
    check = auto_or_positive(flag)

    def normalize(value) -> str | int:
        text = check(value)
        return text if text == "auto" else int(text)
    return normalize


# shared with query-neighbors, which keeps that many neighbors per chunk
NUM_NEIGHBORS_SAVE = Option("num_neighbors_save", int, 20, "Neighbors kept per chunk (and the k of the measured "
                            "recall@k).", minimum=1)


class IndexAddStage(EmbeddingStage):
    """Embed every train chunk once, add it to the index (added_1.000_1.000.faissindex) and tune its search.

    Chunks of the index-training sample reuse the embeddings embed-sampled made. Recall@10 and
    recall@--num-neighbors-save are measured against an exact search of the fixed query set over the whole
    train DB; --nprobe/--ef-search auto choose the cheapest setting that reaches --target-recall.
    """

    name = "index-add"
    needs = ("index-train",)
    group = "index-build"
    unit = "chunks"
    once_resources = Resources(whole_node=True)  # the merge and the recall tuning: faiss on every CPU of a node
    options = (
        NUM_NEIGHBORS_SAVE,
        Option("target_recall", float, 0.95, "Recall@10 the tuned search settings must reach.", minimum=0,
               open_minimum=True, maximum=1),
        Option("nprobe", str, "auto", "IVF lists searched per query, or auto (tuned).",
               normalize=auto_or_positive("--nprobe")),
        Option("ef_search", str, "auto", "HNSW efSearch, or auto (tuned).", normalize=auto_or_positive("--ef-search")),
        Option("index_shards", str, "auto", "Cut the added index into this many shards, each the codes of a "
               "contiguous range of train-DB rows with the one trained quantizer and codebooks (index/.../shards.json "
               "lists them), for an index too large for one node's memory. query-neighbors searches every shard "
               "(on Ray: one searcher actor per shard, placed by its memory) and merges their top-k, which equals "
               "the whole index's search. auto: one index (Megatron's file) where the codes and ids fit "
               "--index-memory (per node), else as many shards as make each fit. 1: always one index; past "
               "--index-memory an IVF index then keeps its lists on disk.", normalize=auto_or_count("--index-shards")),
        Option("keep_embeddings", bool, False, "Also keep float16 embeddings of every train chunk (embed/train/), so "
               "that a later --index-str change (with --force) re-adds them without embedding again. The index "
               "is then built from those float16 values, whether a block was just embedded or read back."),
        *EMBED_OPTIONS,
    )

    def reader(self):
        from retro_pipeline.read import WorkdirReader

        return WorkdirReader(self.workdir)

    @property
    def index_str(self) -> str:
        return self.reader().index_info()["index_str"]

    def n_shards(self, n_blocks: int | None = None) -> int:
        """The shards of the added index: --index-shards, or with auto, 1 where the codes and ids of every
        train chunk fit --index-memory, else the fewest that each fit it."""
        if self.cfg.index_shards != "auto":
            return int(self.cfg.index_shards)
        if "_n_shards" not in self.__dict__:
            need, budget = self.index_bytes(), faiss_index.memory_budget(self.cfg.index_memory)
            n = -(-need // budget)
            blocks = len(self.plan()) if n_blocks is None else n_blocks
            if n > blocks:
                raise RetroError(f"--index-memory {self.cfg.index_memory}: the index needs {need} bytes, {n} shards "
                                 f"of at most {budget} bytes, more than its {blocks} blocks; raise --index-memory "
                                 f"or lower --block-size")
            self._n_shards = max(1, n)
        return self._n_shards

    def index_bytes(self) -> int:
        """Bytes the added index's codes and ids take in memory (from the index string: the trained index, whose
        quantizer can be gigabytes, is not read for it)."""
        reader = self.reader()
        code = faiss_index.code_size(self.index_str, reader.index_info()["dim"])
        return reader.db_num_chunks("train") * (code + 8)

    @property
    def k(self) -> int:
        return max(10, self.cfg.num_neighbors_save)

    # ---- kept embeddings (--keep-embeddings): a cache valid for one embed-sampled fingerprint and inputs
    def kept_source(self) -> dict[str, Any]:
        import hashlib
        import json

        stored = self.workdir.stored()
        inputs = hashlib.sha256(json.dumps(stored.get("inputs") or {}, sort_keys=True).encode()).hexdigest()[:16]
        return {"embed-sampled": (stored.get("fingerprints") or {}).get("embed-sampled"), "inputs": inputs}

    def kept_valid(self) -> bool:
        from retro_pipeline.io import read_json

        return read_json(self.workdir.embed_dir("train") / "_source.json") == self.kept_source()

    # ---- driver side
    def prepare(self) -> None:
        import shutil

        from retro_pipeline.io import sweep_temporaries

        kept = self.workdir.embed_dir("train")
        if kept.exists() and not self.kept_valid():  # made from other settings or inputs
            shutil.rmtree(kept)
        sweep_temporaries(kept)  # blocks an interrupted run was writing (not among this stage's outputs)
        if self.cfg.keep_embeddings and not kept.exists():
            write_json(kept / "_source.json", self.kept_source())
        self.reader().index_info()
        faiss_index.read_index(self.workdir.empty_index_path(self.index_str), "trained index")
        n = self.n_shards()   # before any block is embedded: an --index-memory too small for the blocks fails now
        if n > 1 and self.cfg.index_shards == "auto":
            log.info("index-add: the codes and ids take %d bytes, more than --index-memory %s: %d shards",
                     self.index_bytes(), self.cfg.index_memory, n)

    def plan(self) -> list[Block]:
        n = self.reader().db_num_chunks("train")
        codes, truth = self.workdir.add_codes_dir(self.index_str), self.workdir.add_truth_dir(self.index_str)
        blocks = []
        for s, e in block_ranges(n, rows_per_block(n, self.cfg.block_size, floor=256)):
            name = block_file_name(s, e, n)
            blocks.append(Block(name[:-5], s, e, (str(codes / name), str(truth / name))))
        return blocks

    def outputs(self) -> list[Path]:
        s = self.index_str if self.workdir.index_info_path.exists() else None
        if s is None:
            return []
        return [self.workdir.add_codes_dir(s), self.workdir.add_truth_dir(s), self.workdir.added_lists_dir(s),
                self.workdir.shards_dir(s), self.workdir.shards_path(s), self.workdir.added_index_path(s),
                self.workdir.search_params_path(s)]

    def final_outputs(self) -> list[Path]:
        from retro_pipeline.io import read_json

        s = self.index_str
        listed = read_json(self.workdir.shards_path(s))   # what the finished merge wrote, else what it will write
        if listed is None and (self.workdir.added_index_path(s).exists() or self.n_shards() == 1):
            return [self.workdir.added_index_path(s), self.workdir.search_params_path(s)]
        listed = listed or {}   # a shard gone since is merged again
        return [self.workdir.shards_path(s), *(self.workdir.shards_dir(s) / sh["file"] for sh in
                                               listed.get("shards", ())), self.workdir.search_params_path(s)]

    def finalize_note(self) -> str | None:
        return f"merging the blocks' codes into {self.index_str} and measuring its recall (tuning its search " \
               f"settings to --target-recall where it has any)"

    # ---- worker side
    def setup(self, resources: dict[str, Any]):
        state = super().setup(resources)
        reader = self.reader()
        index = faiss_index.read_index(self.workdir.empty_index_path(self.index_str), "trained index")
        if state["encoder"].dim != index.d:
            raise RetroError(f"{self.workdir.empty_index_path(self.index_str)}: the index takes {index.d}-dimensional "
                             f"vectors but the embedder gives {state['encoder'].dim}; rebuild the index with "
                             f"'retro-pipeline index-build --force' or use the embedder it was trained for")
        faiss_index.faiss().omp_set_num_threads(max(1, int(resources.get("num_cpus") or 1)))
        state.update(index=index, sampled_rows=reader.sampled_train_rows(), queries=reader.queries()[1],
                     kept=bool(self.cfg.keep_embeddings) and self.kept_valid())
        return state

    def kept_path(self, block: Block, state) -> Path | None:
        """The block's --keep-embeddings file where it is read back instead of embedding."""
        kept = self.workdir.embed_dir("train") / Path(block.path).name
        return kept if state["kept"] and kept.exists() else None

    def fresh_rows(self, block: Block, state) -> tuple[np.ndarray, int, int]:
        """(block-relative rows to embed: those not in the sampled DB, start and end of the sampled rows the
        block reuses)."""
        sampled = state["sampled_rows"]
        lo, hi = np.searchsorted(sampled, [block.start, block.end])
        reused = sampled[lo:hi] - block.start
        return np.setdiff1d(np.arange(block.size), reused, assume_unique=True), int(lo), int(hi)

    def texts(self, block: Block, state) -> list[str]:
        if self.kept_path(block, state) is not None:
            return []
        fresh, _, _ = self.fresh_rows(block, state)
        return state["reader"].texts(self.reader().db_chunks("train", block.start, block.end)[fresh])

    def write(self, block: Block, state, fresh_emb: np.ndarray) -> dict[str, Any]:
        f = faiss_index.faiss()
        reader = self.reader()
        s, e = block.start, block.end
        kept = self.workdir.embed_dir("train") / Path(block.path).name
        if self.kept_path(block, state) is not None:
            import h5py

            with h5py.File(kept, "r") as h:
                emb = h["data"][...].astype(np.float32)
            n_fresh, n_reused, n_kept = 0, 0, e - s
        else:
            fresh, lo, hi = self.fresh_rows(block, state)
            emb = np.empty((e - s, state["index"].d), dtype=np.float32)
            if hi > lo:
                emb[state["sampled_rows"][lo:hi] - s] = reader.embedding_rows("sampled", lo, hi)
            emb[fresh] = fresh_emb
            n_fresh, n_reused, n_kept = len(fresh), int(hi - lo), 0
            if self.cfg.keep_embeddings:  # encode what is kept, so a block read back later gives the same codes
                emb16 = emb.astype(np.float16)
                if state["kept"]:
                    with atomic_path(kept) as tmp:
                        with h5_open_write(tmp) as h:
                            h5_create(h, "data", data=emb16)
                emb = emb16.astype(np.float32)
        codes = state["index"].sa_encode(emb)
        k = min(self.k, e - s)
        metric = state["index"].metric_type
        dist, ids = f.knn(state["queries"], emb, k, metric=metric)
        with atomic_path(block.paths[0]) as tmp:
            with h5_open_write(tmp) as h:
                h5_create(h, "data", data=codes)
        with atomic_path(block.paths[1]) as tmp:
            with h5_open_write(tmp) as h:
                h5_create(h, "dist", data=dist.astype(np.float32))
                h5_create(h, "ids", data=(ids + s).astype(np.int64))
        return {"chunks": int(e - s), "embedded": int(n_fresh), "reused": n_reused, "kept": n_kept}

    # ---- --index-shards: each shard merged as its own one-off job
    def shard_groups(self, blocks: list[Block]) -> list[tuple[int, int]]:
        """The blocks of each shard, as (first, end) block indexes: contiguous rows, about equal in size."""
        return faiss_index.shard_bounds([(b.start, b.end) for b in blocks], self.n_shards(len(blocks)))

    def finalize_jobs(self, blocks: list[Block], results: dict[str, dict]) -> list[tuple[str, Any, tuple]]:
        if self.n_shards(len(blocks)) == 1:
            return []
        s, groups = self.index_str, self.shard_groups(blocks)
        jobs = []
        for i, (first, end) in enumerate(groups):
            path = self.workdir.shard_path(s, i, len(groups))
            if path.exists():   # merged before a kill: written atomically, so whole
                continue
            group = blocks[first:end]
            jobs.append((f"shard {i + 1} of {len(groups)}", merge_shard,
                         (str(self.workdir.empty_index_path(s)), [b.paths[0] for b in group],
                          [(b.start, b.end) for b in group], str(path))))
        return jobs

    def _sharded(self, blocks: list[Block]):
        """The shards the finalize jobs merged, as one :class:`faiss_index.ShardedIndex`, and ``shards.json``
        written (the whole index of an older run removed)."""
        s, groups = self.index_str, self.shard_groups(blocks)
        shards, listed = [], []
        for i, (first, end) in enumerate(groups):
            path = self.workdir.shard_path(s, i, len(groups))
            shards.append(faiss_index.read_index(path, "index shard", mmap=True))
            listed.append({"file": path.name, "first_row": int(blocks[first].start),
                           "end_row": int(blocks[end - 1].end), "ntotal": int(shards[-1].ntotal)})
        write_json(self.workdir.shards_path(s), {"index_str": s, "n_shards": len(groups),
                                                 "metric_type": int(shards[0].metric_type), "shards": listed})
        self.workdir.added_index_path(s).unlink(missing_ok=True)
        return faiss_index.ShardedIndex(shards, [sh["first_row"] for sh in listed])

    # ---- the merge: a one-off job
    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        import h5py

        f = faiss_index.faiss()
        f.omp_set_num_threads(faiss_index.threads())
        reader = self.reader()
        index = faiss_index.read_index(self.workdir.empty_index_path(self.index_str), "trained index")
        _, queries = reader.queries()
        heap = f.ResultHeap(len(queries), self.k, keep_max=index.metric_type == f.METRIC_INNER_PRODUCT)

        def add_truth(b: Block) -> None:
            with h5py.File(b.paths[1], "r") as h:
                heap.add_result(h["dist"][...], h["ids"][...])

        def block_codes():
            for b in blocks:
                with h5py.File(b.paths[0], "r") as h:
                    codes = h["data"][...]
                add_truth(b)
                yield codes, np.arange(b.start, b.end, dtype=np.int64)

        n_total = sum(b.size for b in blocks)
        need = n_total * (index.sa_code_size() + 8)
        n_shards = self.n_shards(len(blocks))
        on_disk = n_shards == 1 and need > faiss_index.memory_budget(self.cfg.index_memory)
        if on_disk and (faiss_index.ivf_of(index) is None or faiss_index.is_fast_scan(index)):
            log.warning("index-add: the index needs %d bytes, more than --index-memory, but only IVF indexes "
                        "without fast-scan codes can keep their lists on disk; building it in memory", need)
            on_disk = False
        if n_shards > 1:   # the shards are merged already (finalize_jobs): their ground truth
            for b in blocks:
                add_truth(b)
            index = self._sharded(blocks)
        elif on_disk:
            import tempfile

            log.info("index-add: %d bytes of codes, more than --index-memory: the lists go on disk (%s)", need,
                     self.workdir.added_lists_dir(self.index_str))
            with tempfile.TemporaryDirectory(dir=self.workdir.index_dir(self.index_str)) as scratch:
                index = faiss_index.add_codes_on_disk(index, block_codes(), self.workdir.added_lists_dir(self.index_str),
                                                      scratch)
        else:
            index = faiss_index.add_codes_all(index, block_codes())
        heap.finalize()
        truth = np.where(np.isfinite(heap.D), heap.I, -1)
        given = {key: int(v) for key, v in (("nprobe", self.cfg.nprobe), ("efSearch", self.cfg.ef_search))
                 if v != "auto"}
        params, chosen, table = faiss_index.tune(index, queries, truth, self.cfg.num_neighbors_save,
                                                 self.cfg.target_recall, given, log)
        if n_shards == 1:
            import shutil

            faiss_index.write_index(index, self.workdir.added_index_path(self.index_str))
            self.workdir.shards_path(self.index_str).unlink(missing_ok=True)   # never beside an older run's shards
            shutil.rmtree(self.workdir.shards_dir(self.index_str), ignore_errors=True)
        k = min(self.cfg.num_neighbors_save, truth.shape[1])
        write_json(self.workdir.search_params_path(self.index_str), {
            "index_str": self.index_str, "params": params, "target_recall": self.cfg.target_recall,
            "recall@10": chosen["recall@10"], f"recall@{k}": chosen[f"recall@{k}"], "k": k,
            "n_queries": int(len(queries)), "table": table})
        counts = [r["counts"] for r in results.values()]
        return {"index_str": self.index_str, "n_chunks_added": int(index.ntotal), "lists_on_disk": on_disk,
                "index_shards": n_shards,
                "n_chunks_embedded": sum(c["embedded"] for c in counts),
                "n_chunks_reused": sum(c["reused"] for c in counts),
                "n_chunks_from_kept": sum(c.get("kept", 0) for c in counts), **params,
                "recall@10": chosen["recall@10"], f"recall@{k}": chosen[f"recall@{k}"]}


def merge_shard(empty_path: str, code_paths: list[str], row_ranges: list[tuple[int, int]], out_path: str) -> int:
    """One shard of ``--index-shards``: the trained (empty) index with the codes of the given blocks added,
    ids = their train-DB rows, written atomically to ``out_path``; returns how many it holds."""
    import h5py

    f = faiss_index.faiss()
    f.omp_set_num_threads(faiss_index.threads())
    index = faiss_index.read_index(empty_path, "trained index")

    def codes():
        for path, (s, e) in zip(code_paths, row_ranges):
            with h5py.File(path, "r") as h:
                yield h["data"][...], np.arange(s, e, dtype=np.int64)

    index = faiss_index.add_codes_all(index, codes())
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    faiss_index.write_index(index, out_path)
    failpoint("index-add:shard-merged")
    return int(index.ntotal)
