"""What the pages of ``retro-pipeline serve`` show, read from a workdir: no Flask here, plain dicts.

One :class:`Browser` per served workdir, shared by every request thread. It loads the encoder and the index
once (:meth:`Browser.load`) and reads everything else through :class:`~retro_pipeline.read.WorkdirReader` and
:class:`~retro_pipeline.dataset.RetroSamples` (the body of ``retro.init``; its module-level state is one
workdir per process, so the server holds its own readers). A query is embedded as the build embedded its
chunks: the same embedder, pooling and precision (``embedding_state``, as query-neighbors sets it up, on the
device the build's block markers record, the CPU where that device is missing), and searched with the tuned
settings (``WorkdirReader.index`` sets them; ``faiss_index.search`` orders ties by id). Encoder forwards run
one at a time under a lock (a forward uses every CPU thread anyway), so a query gives the same vector however
many requests run at once; faiss searches of a built index run concurrently (faiss's CPU search is read-only).

Ids are ints; an id out of range, a split without samples or a stage not run is a :class:`NotFound` with
one line saying what exists.
"""

from __future__ import annotations

import threading
from functools import cached_property

import numpy as np

from retro_pipeline.errors import RetroError
from retro_pipeline.samples import SPLITS

MAX_K = 100            # results a search may ask for
MAX_QUERY_CHARS = 2000  # longer queries are refused (the encoder truncates at its max_length anyway)
OCCURRENCES = 6        # pretraining chunks listed on a chunk's page
NEIGHBORS_SHOWN = 3    # neighbors shown per pretraining chunk unless a page asks more
DROPS_KEPT = 64        # samples whose own-document drops are kept once computed


class NotFound(RetroError):
    """An id or split the workdir does not hold: a 404 with this message."""


class Browser:
    """The read side of one workdir for the web pages; ``Browser(workdir)`` checks that it is built enough to
    serve (db-build and index-add done, nothing stale unless ``allow_changed``) and loads nothing big yet."""

    def __init__(self, workdir, allow_changed: bool = False, warn=None):
        from retro_pipeline.read import WorkdirReader
        from retro_pipeline.workdir import Workdir

        self.workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
        root = self.workdir.root
        if not root.is_dir():
            raise RetroError(f"{root}: no such workdir; pass the --workdir of a build "
                             f"('retro-pipeline build --workdir {root}' makes one)")
        self.reader = WorkdirReader(self.workdir)
        self.cfg = self.reader.config   # not a workdir: an error here
        for stage in ("db-build", "index-add"):
            if self.workdir.stage_status(stage)["state"] != "done":
                raise RetroError(f"{root}: {stage} has not finished, so there is nothing to search yet; run "
                                 f"'retro-pipeline build --workdir {root}' first (see 'retro-pipeline status "
                                 f"--workdir {root}')")
        self.has_neighbors = self.workdir.stage_status("query-neighbors")["state"] == "done"
        self.changed = self.reader.check_built(
            ["db-build", "index-add"] + (["query-neighbors"] if self.has_neighbors else []),
            allow_changed, option="--allow-changed", warn=warn)
        self.n_chunks = self.reader.db_num_chunks("train")
        self.index_info = self.reader.index_info()
        self.search_info = self.reader.search_params()
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._state: dict | None = None
        self._samples: dict[str, object] = {}
        self._inverse: dict[tuple, np.ndarray] = {}
        self._dropped: dict[tuple, list] = {}

    # ---- loading (once)
    def load(self) -> dict:
        """The encoder, the chunk reader and the index, loaded on the first call (under a lock) and kept."""
        if self._state is None:
            with self._load_lock:
                if self._state is None:
                    self._state = self._load()
        return self._state

    def _load(self) -> dict:
        import os

        from retro_pipeline.config import resolve
        from retro_pipeline.pipeline import make_stage
        from retro_pipeline.stages.embed import EmbedSampledStage, embedding_state
        from retro_pipeline.verify import recorded_run

        # embed as the build did: its recorded device and precision (a CUDA build on a machine without CUDA: CPU)
        recorded = recorded_run(make_stage(EmbedSampledStage, self.workdir, self.cfg), {})
        given = {k: v for k, v in recorded.items() if k in ("device", "dtype")}
        cfg = resolve(self.workdir.stored(), given)[0]
        state = embedding_state(cfg, {"num_cpus": os.cpu_count() or 1, "num_gpus": 0})
        state["cfg"] = cfg
        state["index"] = self.reader.index(mmap=True)
        if state["index"].d != state["encoder"].dim:
            raise RetroError(f"{self.workdir.root}: the index takes {state['index'].d}-dimensional vectors but the "
                             f"embedder gives {state['encoder'].dim}; rebuild it with 'retro-pipeline index-build "
                             f"--workdir {self.workdir.root} --force'")
        return state

    @cached_property
    def gpt(self):
        return self.reader.chunk_reader.gpt

    @cached_property
    def prefixes(self) -> list[str]:
        return [info["prefix"] for info in self.reader.db_infos()]

    # ---- search
    def embed(self, texts: list[str]) -> np.ndarray:
        from retro_pipeline.stages.embed import embed_texts

        state = self.load()
        with self._encode_lock:
            return embed_texts(state["cfg"], texts, state)

    def search(self, query: str, k: int = 10) -> list[dict]:
        """The ``k`` train-DB chunks nearest to ``query`` (embedded with the build's encoder, searched with the
        tuned settings), best first: rank, chunk id, score (the index's distance), its document and text."""
        from retro_pipeline import faiss_index

        query = (query or "").strip()
        if not query:
            raise RetroError("give a query: some text to search for")
        if len(query) > MAX_QUERY_CHARS:
            raise RetroError(f"the query is {len(query)} characters long; give at most {MAX_QUERY_CHARS}")
        if not 1 <= k <= MAX_K:
            raise RetroError(f"k {k}: give 1..{MAX_K} results")
        index = self.load()["index"]
        scores, ids = faiss_index.search(index, self.embed([query]), min(k, index.ntotal))
        keep = ids[0] >= 0
        return self.chunk_list(ids[0][keep], scores[0][keep])

    def chunk_list(self, ids, scores=None) -> list[dict]:
        """Rows and texts of train-DB chunks ``ids`` (in the order given), with their scores where given."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return []
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = self.reader.db_rows("train", uniq).astype(np.int64)[inv.reshape(-1)]
        texts = self.reader.chunk_texts(rows)
        out = []
        for n, (c, row, text) in enumerate(zip(ids.tolist(), rows.tolist(), texts)):
            item = {"rank": n + 1, "chunk_id": c, "dataset": row[0], "doc": row[1], "token_start": row[2],
                    "token_end": row[3], "text": text}
            if scores is not None:
                item["score"] = float(scores[n])
            out.append(item)
        return out

    @property
    def metric(self) -> str:
        """What a score is: the index's distance."""
        from retro_pipeline import faiss_index

        index = self.load()["index"]
        return "inner product (higher is nearer)" if index.metric_type == faiss_index.faiss().METRIC_INNER_PRODUCT \
            else "squared L2 distance (lower is nearer)"

    # ---- a chunk of the train DB
    def check_chunk(self, i: int) -> int:
        if not 0 <= i < self.n_chunks:
            raise NotFound(f"chunk {i} does not exist: the train DB has {self.n_chunks} chunks (ids 0.."
                           f"{self.n_chunks - 1})")
        return i

    def chunk(self, i: int) -> dict:
        """Chunk ``i`` of the train DB: its corpus, document, tokens and text, the chunk that continues it, the
        chunks before and after it in its document, and the pretraining chunks that hold its tokens."""
        i = self.check_chunk(i)
        lo = max(0, i - 1)
        rows = self.reader.db_chunks("train", lo, i + 2).astype(np.int64)
        me = rows[i - lo]
        same = [int(c) for c, r in zip(range(lo, lo + len(rows)), rows) if c != i and (r[:2] == me[:2]).all()]
        texts = dict(zip(range(lo, lo + len(rows)), self.reader.chunk_texts(rows)))
        ds, doc, a, b, blen = (int(x) for x in me)
        doc_len = int(self.reader.chunk_reader.datasets[ds].sequence_lengths[doc])
        nxt = i + 1 if i + 1 in same else None
        return {"chunk_id": i, "dataset": ds, "prefix": self.prefixes[ds], "doc": doc, "token_start": a,
                "token_end": b, "bert_len": blen, "doc_tokens": doc_len, "text": texts[i],
                "continuation": texts[nxt] if nxt is not None else None,
                "prev": i - 1 if i - 1 in same else None, "next": nxt,
                "occurrences": self.occurrences(ds, doc, a, b) if self.has_neighbors else None}

    def occurrences(self, ds: int, doc: int, a: int, b: int, limit: int = OCCURRENCES,
                    shown: int = NEIGHBORS_SHOWN) -> list[dict]:
        """The pretraining chunks (query chunks of query-neighbors) holding tokens ``a:b`` of document ``doc``
        of corpus ``ds``, most shared tokens first: split, sample, chunk in the sample, tokens shared, and that
        chunk's saved neighbors. A sample's chunks start wherever its window falls, so a DB chunk shares tokens
        with one or two pretraining chunks per time its document comes up in a split's samples."""
        found = []
        for split in SPLITS:
            ss = self.sample_set(split)
            if ss is None or ss.parts[ds] is None:
                continue
            part, seq, cl = ss.parts[ds], ss.seq_length, ss.chunk_length
            starts = part.starts[np.flatnonzero(part.document_index == doc)] + a   # stream position, per epoch
            for p in starts.tolist():
                for j in range(p // seq, (p + b - a - 1) // seq + 1):   # the stream samples the tokens fall in
                    if j >= len(part):
                        continue
                    sample = self.sample_of(split, ds, j)
                    if sample is None:
                        continue
                    first, last = max(p - j * seq, 0), min(p + b - a - j * seq, seq)   # within the sample
                    for c in range(first // cl, (last - 1) // cl + 1):
                        shared = min(last, (c + 1) * cl) - max(first, c * cl)
                        found.append({"split": split, "sample": sample, "chunk": c, "shared": shared})
        found.sort(key=lambda o: (-o["shared"], SPLITS.index(o["split"]), o["sample"], o["chunk"]))
        found = found[:limit]
        for o in found:
            nb = self.neighbors(o["split"])[o["sample"] * self.sample_set(o["split"]).L + o["chunk"]]
            o["n_neighbors"] = int(len(nb))
            o["neighbors"] = self.neighbor_list(nb[:shown])
        return found

    def neighbor_list(self, nb) -> list[dict]:
        """Saved neighbor ids (-1: none) → their chunks, a missing one as ``{"chunk_id": -1}``."""
        nb = np.asarray(nb, np.int64)
        have = iter(self.chunk_list(nb[nb >= 0]))
        return [next(have) if c >= 0 else {"chunk_id": -1} for c in nb.tolist()]

    # ---- pretraining samples
    def sample_set(self, split: str):
        """The split's samples (None where the split has zero width or no samples)."""
        if split not in self._samples:
            with self._load_lock:
                if split not in self._samples:
                    ss = self.reader.samples(split)
                    self._samples[split] = ss if ss.exists and ss.n_samples else None
        return self._samples[split]

    def sample_counts(self) -> dict[str, int]:
        return {s: (self.sample_set(s).n_samples if self.sample_set(s) is not None else 0) for s in SPLITS} \
            if self.has_neighbors else {}

    def sample_of(self, split: str, ds: int, j: int) -> int | None:
        """The split's sample that is stream sample ``j`` of corpus ``ds`` (after the shuffle and the blend),
        or None where the split does not use it."""
        key = (split, ds)
        if key not in self._inverse:
            ss = self.sample_set(split)
            part = ss.parts[ds]
            within = np.empty(len(part), np.int64)     # stream sample -> sample of the corpus
            within[part.shuffle_index.astype(np.int64)] = np.arange(len(part), dtype=np.int64)
            to_split = np.full(len(part), -1, np.int64)  # sample of the corpus -> sample of the split
            mine = np.flatnonzero(ss.corpus == ds)
            to_split[ss.within[mine]] = mine
            self._inverse[key] = to_split[within]
        i = int(self._inverse[key][j])
        return i if i >= 0 else None

    def neighbors(self, split: str) -> np.ndarray:
        key = ("neighbors", split)
        if key not in self._inverse:
            self._inverse[key] = self.reader.neighbors(split)
        return self._inverse[key]

    def retro_samples(self, split: str):
        key = ("retro", split)
        if key not in self._samples:
            from retro_pipeline.dataset import RetroSamples

            self._samples[key] = RetroSamples(self.workdir, split, allow_changed=None)
        return self._samples[key]

    def check_sample(self, split: str, i: int):
        if not self.has_neighbors:
            raise NotFound(f"{self.workdir.root}: query-neighbors has not finished, so there are no pretraining "
                           f"samples with neighbors yet; run 'retro-pipeline query-neighbors --workdir "
                           f"{self.workdir.root}'")
        ss = self.sample_set(split)
        if ss is None:
            raise NotFound(f"the {split} split has no samples in this build (--split {self.cfg.split} and the "
                           f"sample counts ask none)")
        if not 0 <= i < ss.n_samples:
            raise NotFound(f"{split} sample {i} does not exist: the {split} split has {ss.n_samples} samples "
                           f"(0..{ss.n_samples - 1})")
        return ss

    def sample(self, split: str, i: int, shown: int | None = None) -> dict:
        """Sample ``i`` of ``split`` as query-neighbors saw it: its documents, and per chunk its text beside its
        saved neighbors (each with its continuation; -1 shown as missing) and the hits the search ranked among
        them that were dropped for being from one of the sample's own documents."""
        ss = self.check_sample(split, i)
        item = self.retro_samples(split)[i]
        L, cl = ss.L, ss.chunk_length
        tokens = item["text"][:ss.seq_length].reshape(L, cl)
        texts = self.gpt.detokenize_flat(tokens.reshape(-1), np.arange(L + 1) * cl)
        chunks = item["neighbor_chunks"]   # [L, k, 2]: the neighbor and its continuation, -1 where none
        saved = chunks[..., 0]
        chunks = chunks[:, :shown or None]     # the first ``shown`` of them on the page
        ids = chunks[..., 0]
        found = self.chunk_list(ids[ids >= 0])
        conts = chunks[..., 1]
        cont_ids = np.unique(conts[conts >= 0])
        cont_text = dict(zip(cont_ids.tolist(), self.chunk_texts(cont_ids)))
        docs = ss.doc_ids(i)
        key = ("dropped", split, i)
        dropped = self._dropped.get(key)
        if dropped is None:   # an encoder forward of the sample's chunks: kept for the pages asked last
            dropped = self.dropped_own(ss, i, texts, docs, saved)
            with self._load_lock:
                self._dropped[key] = dropped
                while len(self._dropped) > DROPS_KEPT:
                    self._dropped.pop(next(iter(self._dropped)))
        it = iter(found)
        out = []
        for j in range(L):
            nbs = []
            for m in range(ids.shape[1]):
                if ids[j, m] < 0:
                    nbs.append({"chunk_id": -1})
                    continue
                n = next(it)
                c = int(conts[j, m])
                nbs.append({**n, "continuation": cont_text.get(c) if c >= 0 else None})
            out.append({"chunk": j, "text": texts[j], "neighbors": nbs, "dropped": dropped[j]})
        return {"split": split, "sample": i, "n_samples": ss.n_samples, "seq_length": ss.seq_length,
                "chunk_length": cl, "L": L, "k": int(saved.shape[1]), "shown": int(ids.shape[1]),
                "docs": [{"dataset": int(d), "doc": int(x)} for d, x in docs.tolist()], "chunks": out,
                "num_neighbors_query": self.cfg.num_neighbors_query}

    def chunk_texts(self, ids) -> list[str]:
        ids = np.asarray(ids, np.int64)
        return self.reader.chunk_texts(self.reader.db_rows("train", ids)) if len(ids) else []

    def dropped_own(self, ss, i: int, texts: list[str], docs: np.ndarray, saved: np.ndarray) -> list[list[dict]]:
        """Per chunk of sample ``i``: the hits query-neighbors dropped because they are from a document of the
        sample, among those the search ranked before its last saved neighbor (all of the search's hits where
        fewer than --num-neighbors-save were kept). Recomputed here: the chunks embedded and searched again
        with the tuned settings, as query-neighbors searched them."""
        from retro_pipeline import faiss_index

        index = self.load()["index"]
        kq = min(self.cfg.num_neighbors_query, index.ntotal)
        _, found = faiss_index.search(index, self.embed(texts), kq)
        hits = found[found >= 0]
        rows = self.reader.db_rows("train", np.unique(hits)).astype(np.int64) if len(hits) else np.zeros((0, 5))
        doc_of = dict(zip(np.unique(hits).tolist(), map(tuple, rows[:, :2].tolist())))
        own = set(map(tuple, docs.tolist()))
        k = saved.shape[1]
        out = []
        for j in range(len(texts)):
            kept, drops = 0, []
            for rank, c in enumerate(found[j].tolist()):
                if c < 0 or kept >= k:
                    break
                if doc_of[c] in own:
                    drops.append({"chunk_id": c, "rank": rank + 1, "dataset": doc_of[c][0], "doc": doc_of[c][1]})
                else:
                    kept += 1
            out.append(drops)
        return out

    # ---- the build
    def status(self) -> list[dict]:
        """Per stage: as ``retro-pipeline status`` says it."""
        from retro_pipeline.cli import status_rows

        return [{"stage": n, "state": s, "detail": d} for n, s, d in status_rows(self.workdir)]
