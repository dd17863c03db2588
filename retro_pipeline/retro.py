"""Megatron's ``retro`` inspection API over a workdir: ``from retro_pipeline import retro; retro.init("W")``.

Names, arguments and return types follow Megatron-LM's ``tools/retro/cli`` (``retro.get_db_chunk_text(i)``,
``retro.get_pt_sample("train", i)``, ...); Megatron's data keys are the split names "train", "valid", "test".
Where this differs from Megatron, the function says so. Everything reads through
:class:`~retro_pipeline.read.WorkdirReader` and :mod:`retro_pipeline.dataset`, lazily; only
:func:`get_pt_dataset` imports torch. Mistakes (a getter before :func:`init`, an id out of range, an unknown
split, a stage not run yet) raise :class:`~retro_pipeline.errors.RetroError` with one line saying what to do.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from retro_pipeline.errors import RetroError


class _State:
    def __init__(self, workdir, allow_changed: bool = False, option: str = "allow_changed=True", warn=None):
        from retro_pipeline.read import WorkdirReader
        from retro_pipeline.workdir import Workdir

        self.reader = WorkdirReader(workdir if isinstance(workdir, Workdir) else Workdir(workdir))
        self.root = self.reader.workdir.root
        self.allow_changed, self.option, self.warn = allow_changed, option, warn
        self.warned: set[str] = set()
        self.config = self.reader.config  # not a workdir: an error here
        self.check(["db-build"])  # the DB and the corpus it points into; a changed corpus: an error here
        self.n_chunks = self.reader.db_num_chunks("train")  # no DB yet: an error here
        self.samples: dict = {}
        self.datasets: dict = {}

    @cached_property
    def gpt(self):
        return self.reader.chunk_reader.gpt

    @cached_property
    def bert(self):
        from retro_pipeline.tokenizers import load_embedder_tokenizer

        return load_embedder_tokenizer(self.config.embedder_spec())

    def sample_set(self, split: str):
        if split not in self.samples:
            self.samples[split] = self.reader.samples(split)
        return self.samples[split]

    def check(self, stages) -> None:
        """Refuse (or, with allow_changed, warn once per change) where ``stages`` are stale."""
        self.reader.check_built(stages, self.allow_changed, option=self.option, warn=self._warn)

    def _warn(self, msg: str) -> None:
        if msg not in self.warned:
            self.warned.add(msg)
            if self.warn is not None:
                self.warn(msg)
            else:
                from retro_pipeline.read import warn_changed

                warn_changed(msg)

    def dataset(self, split: str):
        if split not in self.datasets:
            from retro_pipeline.dataset import RetroSamples

            self.check(["db-build", "query-neighbors"])
            self.datasets[split] = RetroSamples(self.reader.workdir, split, allow_changed=None)
        return self.datasets[split]


_state: _State | None = None


def init(workdir, allow_changed: bool = False) -> None:
    """Read the workdir ``workdir`` (a path or :class:`~retro_pipeline.workdir.Workdir`) from now on; it needs a
    finished db-build, and query-neighbors for the pretraining-sample functions. Prints nothing (Megatron's
    prints a usage summary).

    What ``retro-pipeline status`` calls stale is refused as the build refuses it: a corpus or tokenizer file
    that changed since the DB was built (its texts would not be the DB's), or the neighbors of a stale
    query-neighbors. ``allow_changed=True`` reads them anyway, with a
    :class:`~retro_pipeline.read.ChangedInputWarning`."""
    _init(workdir, allow_changed)


def _init(workdir, allow_changed: bool = False, option: str = "allow_changed=True", warn=None) -> None:
    """:func:`init`; ``option`` names how the user allows a changed input, ``warn`` says it (the CLI's)."""
    global _state
    _state = None
    _state = _State(workdir, allow_changed, option, warn)


def _s() -> _State:
    if _state is None:
        raise RetroError("retro: no workdir yet; call retro.init('path/to/workdir') first")
    return _state


def _check_chunk(idx: int) -> int:
    s, idx = _s(), int(idx)
    if not 0 <= idx < s.n_chunks:
        raise RetroError(f"{s.root}: chunk id {idx} out of range; the train DB has {s.n_chunks} chunks "
                         f"(0..{s.n_chunks - 1})")
    return idx


# ---- utils
def gpt_to_text(tokens) -> str | list:
    """Text of GPT token ids, special tokens (such as EOD padding) skipped; an array of several sequences (the
    last axis is tokens, e.g. a sample's ``neighbor_tokens``) gives nested lists of texts, in one batch."""
    t = np.asarray(tokens, np.int64)
    flat = t.reshape(1, -1) if t.ndim <= 1 else t.reshape(int(np.prod(t.shape[:-1])), t.shape[-1])
    texts = _s().gpt.detokenize_flat(flat.reshape(-1), np.arange(len(flat) + 1) * flat.shape[1])
    return texts[0] if t.ndim <= 1 else np.array(texts, dtype=object).reshape(t.shape[:-1]).tolist()


def text_to_bert(text: str) -> list[int]:
    """BERT (embedder) token ids of ``text``, without special tokens: what ``bert_len`` counts."""
    return _s().bert.encode(text, add_special_tokens=False).ids


def bert_to_text(tokens) -> str:
    return _s().bert.decode(np.asarray(tokens, np.int64).tolist())


# ---- chunk database (db/merged/train.hdf5; its rows are the chunk ids that neighbors refer to)
def get_db_num_indexed_datasets() -> int:
    """Number of corpora in the blend."""
    return len(_s().reader.db_infos())


def get_db_indexed_dataset_infos() -> list[tuple[float, str]]:
    """(ratio, prefix) of each corpus, as Megatron returns them; the full records (document and chunk
    counts) are ``db/indexed_dataset_infos.json``."""
    return [(info["ratio"], info["prefix"]) for info in _s().reader.db_infos()]


def get_db_num_chunks() -> int:
    return _s().n_chunks


def get_db_chunk_rows(ids) -> np.ndarray:
    """int64 [n, 5] (dataset_idx, doc_id, token_start, token_end, bert_len) of the train-DB chunks ``ids``, in
    the order given (not in Megatron)."""
    ids = np.atleast_1d(np.asarray(ids, np.int64))
    bad = ids[(ids < 0) | (ids >= _s().n_chunks)]
    if len(bad):
        _check_chunk(bad[0])
    uniq, inv = np.unique(ids, return_inverse=True)
    return _s().reader.db_rows("train", uniq).astype(np.int64)[inv.reshape(-1)]


def get_db_chunk_gpt(idx: int) -> list[int]:
    """GPT token ids of chunk ``idx``: ``token_end - token_start`` of them (Megatron pads to chunk_length with EOD)."""
    ds, doc, a, b, _ = (int(x) for x in get_db_chunk_rows([idx])[0])
    return _s().reader.chunk_reader.datasets[ds].get(doc, a, b - a).astype(np.int64).tolist()


def get_db_chunk_bert(idx: int) -> list[int]:
    """BERT (embedder) token ids of chunk ``idx``'s text; their number is its ``bert_len``."""
    return text_to_bert(get_db_chunk_text(idx))


def get_db_chunk_text(idx: int) -> str:
    return _s().reader.chunk_texts(get_db_chunk_rows([idx]))[0]


def get_db_chunk_and_continuation_text(idx: int) -> list[str]:
    """[text of chunk ``idx``, text of the chunk after it], the second "" when chunk ``idx`` ends its document
    (Megatron takes the next row whatever document it is in, wrapping around at the end)."""
    idx = _check_chunk(idx)
    rows = _s().reader.db_chunks("train", idx, idx + 2).astype(np.int64)
    texts = _s().reader.chunk_texts(rows)
    same = len(rows) == 2 and (rows[0, :2] == rows[1, :2]).all()
    return [texts[0], texts[1] if same else ""]


# ---- pretraining samples and their neighbors
def get_pt_num_samples_and_chunks(split: str) -> tuple[int, int]:
    ss = _s().sample_set(split)
    return ss.n_samples, ss.n_samples * ss.L


def get_pt_num_samples(split: str) -> int:
    return get_pt_num_samples_and_chunks(split)[0]


def get_pt_num_chunks(split: str) -> int:
    """Chunks of the split's samples: ``L = seq_length / chunk_length`` per sample."""
    return get_pt_num_samples_and_chunks(split)[1]


def get_pt_dataset(split: str, num_neighbors: int | None = None, num_continuations: int = 2):
    """The :class:`~retro_pipeline.dataset.RetroDataset` (a torch Dataset) of ``split``; stale neighbors are
    refused, or allowed with a warning, as :func:`init` was told."""
    from retro_pipeline.dataset import RetroDataset

    s = _s()
    s.check(["db-build", "query-neighbors"])
    return RetroDataset(s.reader.workdir, split, num_neighbors, num_continuations, allow_changed=None)


def get_pt_sample(split: str, idx: int) -> dict[str, np.ndarray]:
    """Item ``idx`` of ``split``'s RetroDataset (``text``, ``neighbor_chunks``, ``neighbor_tokens``,
    ``neighbor_mask``; every saved neighbor, one continuation) plus ``doc_ids`` int64 [n, 2]: the
    (dataset_idx, doc_id) of the documents the sample spans, none of which is ever its neighbor."""
    s, idx = _s(), int(idx)
    ds = s.dataset(split)
    if not len(ds):
        ss = s.reader.samples(split)
        if not ss.exists or all(b <= a for a, b in ss.doc_ranges):
            raise RetroError(f"{s.root}: the {split} split has no documents (--split {s.reader.config.split} gives "
                             f"it none); nothing to show: build with a --split that gives it documents")
        why = "--train-samples, --seq-length" if split == "train" else "--eval-iters, --global-batch-size"
        raise RetroError(f"{s.root}: the {split} split has no samples (Megatron's training asks none of it by "
                         f"{why}); nothing to show")
    if not 0 <= idx < len(ds):
        raise RetroError(f"{s.root}: sample {idx} out of range; the {split} split has {len(ds)} samples "
                         f"(0..{len(ds) - 1})")
    return {**ds[idx], "doc_ids": s.sample_set(split).doc_ids(idx).astype(np.int64)}


def get_neighbor_tokens(sample_id: int, chunk_id: int, data_key: str = "train") -> dict[str, np.ndarray]:
    """``chunk_tokens`` (the chunk's GPT tokens) and ``neighbor_tokens`` [k, r * chunk_length] of chunk
    ``chunk_id`` of sample ``sample_id`` (Megatron returns None on any error; this raises)."""
    sample = get_pt_sample(data_key, sample_id)
    L, cl = sample["neighbor_chunks"].shape[0], _s().config.chunk_length
    if not 0 <= int(chunk_id) < L:
        raise RetroError(f"chunk {chunk_id} out of range; a sample has {L} chunks (0..{L - 1})")
    c = int(chunk_id)
    return {"chunk_tokens": sample["text"][c * cl:(c + 1) * cl], "neighbor_tokens": sample["neighbor_tokens"][c]}


def print_neighbor_texts(sample_id: int, chunk_id: int, data_key: str = "train", width: int = 150) -> None:
    """Print chunk ``chunk_id`` of sample ``sample_id`` and its neighbors' texts (each with its continuation),
    as Megatron does; a missing neighbor prints as ``<none>``."""
    sample = get_pt_sample(data_key, sample_id)
    tokens = get_neighbor_tokens(sample_id, chunk_id, data_key)
    print("~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~")
    print("PRETRAINING CHUNK:")
    print("  - %s" % shorten(gpt_to_text(tokens["chunk_tokens"]), width))
    print("NEIGHBOR_CHUNKS:")
    for present, text in zip(sample["neighbor_mask"][int(chunk_id), :, 0], gpt_to_text(tokens["neighbor_tokens"])):
        print("  - %s" % (shorten(text, width) if present else "<none>"))


def shorten(s: str, n: int) -> str:
    """``s`` on one line, its middle cut out when it is longer than ``n`` (as Megatron's shorten_str)."""
    s = "\\n".join(s.splitlines())
    return s if len(s) <= n else "%s ... %s" % (s[:n // 2], s[-(n // 2):])
