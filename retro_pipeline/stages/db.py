"""db-build: GPT token corpora → RETRO chunk database (docs/formats.md §2).

Blocks are document ranges of one corpus. A block cuts its documents into chunks, detokenizes every chunk
with the GPT tokenizer, re-tokenizes the text with the embedder's tokenizer and files the chunk as valid
(non-empty) or invalid. Finalizing splits documents into train and valid, draws the index-training sample
and streams the blocks, one at a time, into ``db/merged/{train,sampled,valid}.hdf5``.

Split modes: ``megatron`` (default) takes the first ``int(train_fraction * n_docs)`` documents of each corpus
as train and the first chunks as the index-training sample, as megatron-core does, chunk for chunk: the
documents of Megatron's GPT valid and test ranges (the last ones, by ``round()``) then never enter the
retrieval database. ``random`` picks exactly as many train documents at random (seeded) and a random
sample of train chunks: for a corpus whose document order is not shuffled (sorted by source or date), where
the first documents would be a biased database and index sample; the database then holds documents of
Megatron's valid and test samples, so use it when those are not evaluated on (see the README).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline import sizing
from retro_pipeline.arrays import offsets
from retro_pipeline.chunks import BertLengths, chunk_spans, chunk_texts, doc_lengths_without_eod
from retro_pipeline.config import DEFAULT_EMBEDDER
from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, h5_create, h5_open_write, write_json
from retro_pipeline.stage import Block, Option, Resources, Stage, block_file_name, block_ranges, rows_per_block

log = logging.getLogger(__name__)

TEXT_BATCH = 16384  # chunks detokenized and re-tokenized per call


SPLIT_MODES = ("random", "megatron")


def normalize_blend(spec) -> list[str]:
    """A blend as Megatron's ``data_path`` list with absolute prefixes (files are checked in prepare)."""
    from retro_pipeline.corpus import blend_to_list, parse_blend

    return blend_to_list([(w, os.path.abspath(os.path.expanduser(p))) for w, p in parse_blend(spec, check_files=False)])


def normalize_split(split) -> str:
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise RetroError(f"--split {split!r}: not numbers; give train,valid,test proportions such as 98,2,0") from None
    if len(parts) == 2:
        parts.append(0.0)
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise RetroError(f"--split {split!r}: need three non-negative proportions with train > 0, e.g. 98,2,0")
    return ",".join(f"{p:g}" for p in parts)


def normalize_ntrain(value) -> str:
    ntrain = str(value)
    if ntrain != "auto" and not (ntrain.isdigit() and int(ntrain) > 0):
        raise RetroError(f"--index-ntrain {ntrain!r}: give a positive number of chunks or 'auto'")
    return ntrain


class DBBuildStage(Stage):
    """Chunk the corpora into db/individual blocks and db/merged/{train,sampled,valid}.hdf5.

    Each corpus is cut into chunks of --chunk-length GPT tokens per document; every chunk's text is
    measured with the embedder's tokenizer (empty ones are set aside), documents are split into train and
    valid, and the index-training sample is drawn from the train chunks (docs/formats.md §2).
    """

    name = "db-build"
    unit = "docs"
    resources = Resources(cpus=1)
    options = (
        Option("data_path", str, (), "GPT token corpora: 'PREFIX' or a blend 'W1 PREFIX1 W2 PREFIX2 ...' of Megatron "
               ".bin/.idx files. Required at the first run.", normalize=normalize_blend, shown_default="none"),
        Option("gpt_tokenizer", str, "", "Tokenizer of those corpora: a tokenizer.json, a directory, 'gpt2' "
               "(packaged GPT-2 BPE) or a hub id. Required at the first run.", path=True, shown_default="none"),
        Option("embedder", str, DEFAULT_EMBEDDER, "Encoder for chunk embeddings (its tokenizer also measures "
               "chunks here): a directory or hub id.", path=True, shown_default="the packaged all-MiniLM-L6-v2"),
        Option("chunk_length", int, 64, "GPT tokens per chunk.", minimum=1),
        Option("split", str, "98,2,0", "train,valid,test proportions of documents.", normalize=normalize_split),
        Option("split_mode", str, "megatron", "megatron: the first documents are the train DB and the first "
               "chunks the index sample, as Megatron (its valid/test documents stay out of the DB); random: a "
               "seeded random train DB and index sample, for corpora in a biased order.", choices=SPLIT_MODES),
        Option("seed", int, 1234, "Seed of every random choice.", minimum=0),
        Option("index_ntrain", str, "auto", "Chunks sampled to train the index, or 'auto'.",
               normalize=normalize_ntrain),
        Option("block_size", int, 100000, "Rows per block file at most: the unit of work and of resume; small "
               "inputs are cut into about 64 blocks.", minimum=1),
    )

    def __init__(self, workdir, cfg, **kw):
        super().__init__(workdir, cfg, **kw)
        self._datasets = None

    def __getstate__(self):  # memory maps stay on the process that opened them
        return {**self.__dict__, "_datasets": None}

    # ---- driver side
    def dir_names(self) -> list[str]:
        names = [Path(p).name for _, p in self.cfg.blend()]
        for i, n in enumerate(names):
            if names.count(n) > 1:
                raise RetroError(f"--data-path: two corpora share the name '{n}' ({self.cfg.blend()[i][1]}); "
                                 f"rename one (block directories are keyed by the prefix's base name)")
        return names

    def datasets(self):
        if self._datasets is None:
            from retro_pipeline.corpus import IndexedDataset

            self._datasets = [IndexedDataset(p) for _, p in self.cfg.blend()]
        return self._datasets

    def prepare(self) -> None:
        from retro_pipeline.corpus import parse_blend
        from retro_pipeline.tokenizers import load_embedder_tokenizer, load_gpt_tokenizer

        if not self.cfg.data_path:
            raise RetroError("--data-path is required on the first run of a workdir: give 'PREFIX' or "
                             "'W1 PREFIX1 W2 PREFIX2' naming Megatron .bin/.idx corpora")
        if not self.cfg.gpt_tokenizer:
            raise RetroError("--gpt-tokenizer is required on the first run of a workdir: the tokenizer the "
                             "corpora were made with (a tokenizer.json, a directory, 'gpt2' or a hub id)")
        parse_blend(self.cfg.data_path, check_files=True)
        self.dir_names()
        for ds in self.datasets():
            if len(ds) == 0:
                raise RetroError(f"{ds.prefix}.idx: the corpus has no documents; preprocess some text into it "
                                 f"or drop it from --data-path")
        load_gpt_tokenizer(self.cfg.gpt_tokenizer)
        load_embedder_tokenizer(self.cfg.embedder_spec())

    def plan(self) -> list[Block]:
        blocks = []
        for ds_idx, (ds, dname) in enumerate(zip(self.datasets(), self.dir_names())):
            n = len(ds)
            d = self.workdir.individual_db_dir(dname)
            for s, e in block_ranges(n, rows_per_block(n, self.cfg.block_size, floor=32)):
                fname = block_file_name(s, e, n)
                blocks.append(Block(f"{dname}/{fname[:-5]}", s, e, str(d / fname), {"ds": ds_idx}))
        return blocks

    def outputs(self) -> list[Path]:
        return [self.workdir.db_dir]

    def input_files(self) -> list[Path]:
        from retro_pipeline.fingerprints import model_files

        files = [Path(prefix + suffix) for _, prefix in self.cfg.blend() for suffix in (".idx", ".bin")]
        return files + model_files(self.cfg.gpt_tokenizer, "gpt") + model_files(self.cfg.embedder_spec(), "embedder")

    def final_outputs(self) -> list[Path]:
        return [self.workdir.merged_db_path(n) for n in ("train", "sampled", "valid")] + [self.workdir.infos_path]

    # ---- worker side
    def setup(self, resources: dict[str, Any]):
        from retro_pipeline.corpus import IndexedDataset
        from retro_pipeline.tokenizers import load_embedder_tokenizer, load_gpt_tokenizer

        return {
            "gpt": load_gpt_tokenizer(self.cfg.gpt_tokenizer),
            "bert_lengths": BertLengths(load_embedder_tokenizer(self.cfg.embedder_spec())),
            "datasets": [IndexedDataset(p) for _, p in self.cfg.blend()],
        }

    def process(self, block: Block, state) -> dict[str, Any]:
        ds = state["datasets"][block.meta["ds"]]
        gpt = state["gpt"]
        s, e = block.start, block.end
        offs = np.asarray(ds.sequence_offsets[s:e + 1], dtype=np.int64)
        tokens = np.asarray(ds.tokens[offs[0]:offs[-1]])
        rel = offs - offs[0]
        if tokens.size:
            mx = int(tokens.max())
            if mx >= gpt.vocab_size:
                raise RetroError(
                    f"{ds.prefix}.bin: token id {mx} in documents {s}..{e - 1} is not in the vocabulary of "
                    f"--gpt-tokenizer {self.cfg.gpt_tokenizer} ({gpt.vocab_size} tokens); pass the tokenizer "
                    f"the corpus was made with")
        lengths = doc_lengths_without_eod(tokens, rel, gpt.eod_id)
        doc_idx, start, end = chunk_spans(lengths, self.cfg.chunk_length)
        n = len(doc_idx)
        blen = np.zeros(n, dtype=np.int64)
        for i in range(0, n, TEXT_BATCH):
            j = min(i + TEXT_BATCH, n)
            texts = chunk_texts(gpt, tokens, rel[doc_idx[i:j]] + start[i:j], end[i:j] - start[i:j])
            blen[i:j] = state["bert_lengths"](texts)
        rows = np.stack([doc_idx + s, start, end, blen], axis=1).astype(np.uint32)
        valid = blen > 0
        per_doc = np.bincount(doc_idx[valid], minlength=e - s)
        doc_offsets = np.stack([np.arange(s, e), offsets(per_doc)[1:]], axis=1).astype(np.uint64)
        with atomic_path(block.path) as tmp:
            with h5_open_write(tmp) as f:
                h5_create(f, "chunks_valid", data=rows[valid].reshape(-1, 4))
                h5_create(f, "chunks_invalid", data=rows[~valid].reshape(-1, 4))
                h5_create(f, "doc_offsets", data=doc_offsets.reshape(-1, 2))
        return {"docs": e - s, "tokens": int(tokens.size), "chunks_valid": int(valid.sum()),
                "chunks_invalid": int(n - valid.sum())}

    # ---- finalize
    def train_doc_mask(self, ds_idx: int, n_docs: int, n_train: int, ranges: list[tuple[int, int]]):
        """Yield the train-document mask of each block range; memory is per block, not per corpus."""
        if self.cfg.split_mode == "megatron":
            for s, e in ranges:
                yield np.arange(s, e) < n_train
            return
        # Exactly n_train documents, uniformly at random: a hypergeometric draw says how many of them fall
        # in each block, then a per-block draw says which.
        rng = np.random.default_rng([self.cfg.seed, ds_idx, 0])
        left_train, left_other = n_train, n_docs - n_train
        for s, e in ranges:
            k = int(rng.hypergeometric(left_train, left_other, e - s)) if left_train and left_other else (
                e - s if left_train else 0)
            left_train -= k
            left_other -= (e - s) - k
            mask = np.zeros(e - s, dtype=bool)
            mask[np.random.default_rng([self.cfg.seed, ds_idx, 1, s]).choice(e - s, k, replace=False)] = True
            yield mask

    def finalize(self, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
        import h5py

        cfg, wd = self.cfg, self.workdir
        train_frac = cfg.split_fractions()[0]
        blend = cfg.blend()
        per_ds = [[b for b in blocks if b.meta["ds"] == i] for i in range(len(blend))]

        def block_doc_counts(b: Block) -> np.ndarray:
            with h5py.File(b.path, "r") as f:
                cum = f["doc_offsets"][:, 1].astype(np.int64)
            return np.diff(cum, prepend=0)

        # Pass 1: counts.
        infos = []
        for ds_idx, ((ratio, prefix), bl) in enumerate(zip(blend, per_ds)):
            n_docs = len(self.datasets()[ds_idx])
            n_docs_train = int(train_frac * n_docs)
            masks = self.train_doc_mask(ds_idx, n_docs, n_docs_train, [(b.start, b.end) for b in bl])
            n_chunks_train = sum(int(block_doc_counts(b)[m].sum()) for b, m in zip(bl, masks))
            infos.append({
                "ratio": ratio, "prefix": prefix, "n_docs": n_docs, "n_docs_train": n_docs_train,
                "n_chunks": sum(results[b.name]["counts"]["chunks_valid"] for b in bl),
                "n_chunks_train": n_chunks_train,
                "n_chunks_invalid": sum(results[b.name]["counts"]["chunks_invalid"] for b in bl),
            })
        n_train_total = sum(d["n_chunks_train"] for d in infos)
        if n_train_total == 0:
            raise RetroError(f"--data-path: no valid train chunks in {', '.join(p for _, p in blend)} (every "
                             f"chunk is empty in the embedder's vocabulary, or the train split is empty); "
                             f"check the corpus, --split and --embedder")
        auto = cfg.index_ntrain == "auto"
        ntrain = sizing.auto_ntrain(n_train_total) if auto else int(cfg.index_ntrain)
        ratio_sum = sum(r for r, _ in blend)
        # The largest sample whose shares follow the blend weights exactly.
        fits = min(int(d["n_chunks_train"] * ratio_sum / d["ratio"]) for d in infos)
        if ntrain > fits:
            limit = min(infos, key=lambda d: d["n_chunks_train"] * ratio_sum / d["ratio"])
            if not auto:
                raise RetroError(f"--index-ntrain {ntrain}: {limit['prefix']} (weight {limit['ratio']:g}) has only "
                                 f"{limit['n_chunks_train']} train chunks, too few for its share; lower "
                                 f"--index-ntrain to {fits} or less, lower its weight, or use auto")
            log.warning("index-training sample: %d chunks instead of %d, so that its shares follow the blend "
                        "weights: %s (weight %g) has only %d train chunks", fits, ntrain, limit["prefix"],
                        limit["ratio"], limit["n_chunks_train"])
            ntrain = fits
        for d in infos:
            d["n_chunks_sampled"] = min(int(ntrain * d["ratio"] / ratio_sum), d["n_chunks_train"])

        # Pass 2: stream the blocks into the merged files.
        n_valid_total = sum(d["n_chunks"] - d["n_chunks_train"] for d in infos)
        n_sampled_total = sum(d["n_chunks_sampled"] for d in infos)
        n_docs_train_total = sum(d["n_docs_train"] for d in infos)
        paths = {n: wd.merged_db_path(n) for n in ("train", "sampled", "valid")}
        with atomic_path(paths["train"]) as t_train, atomic_path(paths["sampled"]) as t_sampled, \
                atomic_path(paths["valid"]) as t_valid, h5_open_write(t_train) as f_train, \
                h5_open_write(t_sampled) as f_sampled, h5_open_write(t_valid) as f_valid:
            train_chunks = h5_create(f_train, "chunks", shape=(n_train_total, 5), dtype="uint32")
            train_docs = h5_create(f_train, "doc_offsets", shape=(n_docs_train_total, 3), dtype="uint64")
            sampled_chunks = h5_create(f_sampled, "chunks", shape=(n_sampled_total, 5), dtype="uint32")
            sampled_rows = h5_create(f_sampled, "train_rows", shape=(n_sampled_total,), dtype="uint64")
            valid_chunks = h5_create(f_valid, "chunks", shape=(n_valid_total, 5), dtype="uint32")
            pos = {"train": 0, "doc": 0, "sampled": 0, "valid": 0}
            for ds_idx, (d, bl) in enumerate(zip(infos, per_ds)):
                sample = self.sample_rows(ds_idx, d["n_chunks_train"], d["n_chunks_sampled"])
                ds_train_start = pos["train"]
                masks = self.train_doc_mask(ds_idx, d["n_docs"], d["n_docs_train"], [(b.start, b.end) for b in bl])
                for b, mask in zip(bl, masks):
                    with h5py.File(b.path, "r") as f:
                        cv = f["chunks_valid"][...].reshape(-1, 4)
                        cum = f["doc_offsets"][:, 1].astype(np.int64)
                    counts = np.diff(cum, prepend=0)
                    chunk_mask = np.repeat(mask, counts)
                    full = np.empty((len(cv), 5), dtype=np.uint32)
                    full[:, 0] = ds_idx
                    full[:, 1:] = cv
                    tr, va = full[chunk_mask], full[~chunk_mask]
                    r0 = pos["train"]
                    train_chunks[r0:r0 + len(tr)] = tr
                    pos["train"] += len(tr)
                    valid_chunks[pos["valid"]:pos["valid"] + len(va)] = va
                    pos["valid"] += len(va)
                    doc_ids = np.arange(b.start, b.end)[mask]
                    ends = r0 + offsets(counts[mask])[1:]
                    docs = np.stack([np.full(len(doc_ids), ds_idx), doc_ids, ends], axis=1).astype(np.uint64)
                    train_docs[pos["doc"]:pos["doc"] + len(docs)] = docs
                    pos["doc"] += len(docs)
                    # Sampled chunks falling in this block's train rows (sample is sorted, per dataset).
                    lo, hi = r0 - ds_train_start, pos["train"] - ds_train_start
                    sel = sample[np.searchsorted(sample, lo):np.searchsorted(sample, hi)]
                    if len(sel):
                        p = pos["sampled"]
                        sampled_chunks[p:p + len(sel)] = tr[sel - lo]
                        sampled_rows[p:p + len(sel)] = sel + ds_train_start
                        pos["sampled"] += len(sel)
            assert pos == {"train": n_train_total, "doc": n_docs_train_total, "sampled": n_sampled_total,
                           "valid": n_valid_total}, pos
            for f, n in ((f_train, n_train_total), (f_sampled, n_sampled_total), (f_valid, n_valid_total)):
                h5_create(f, "n_written", data=np.array([n], dtype=np.uint64))
        write_json(wd.infos_path, infos)
        return {"n_chunks_train": n_train_total, "n_chunks_sampled": n_sampled_total,
                "n_chunks_valid": n_valid_total, "n_chunks_invalid": sum(d["n_chunks_invalid"] for d in infos),
                "n_docs": sum(d["n_docs"] for d in infos)}

    def sample_rows(self, ds_idx: int, n_train: int, k: int) -> np.ndarray:
        """Sorted rows (within the dataset's train chunks) of the index-training sample."""
        if self.cfg.split_mode == "megatron":
            return np.arange(k, dtype=np.int64)
        rng = np.random.default_rng([self.cfg.seed, ds_idx, 2])
        return np.sort(rng.choice(n_train, size=k, replace=False)).astype(np.int64)
