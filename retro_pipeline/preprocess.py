"""Raw text → Megatron indexed dataset: read documents, tokenize in batches, append EOD, write atomically.

Inputs are JSONL (``.jsonl``/``.json``, optionally ``.gz``; one JSON object per line), Parquet (``.parquet``),
plain text files (one file = one document) and directories of any of these (walked recursively in sorted order,
hidden files skipped). Documents that tokenize to nothing are skipped, as Megatron's preprocess_data.py does.

With ``workers > 1`` the driver cuts the document stream into consecutive shards and tokenizes them in Ray
tasks, writing the results back in shard order: the output is byte-identical for any worker count.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from retro_pipeline.errors import RetroError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [path]


def _iter_jsonl(path: Path, text_key: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise RetroError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)}); each line must be "
                                 f"one JSON object such as {{\"{text_key}\": \"...\"}}") from None
            if not isinstance(obj, dict) or text_key not in obj:
                keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
                raise RetroError(f"{path}:{lineno}: no '{text_key}' key (found: {keys}); pass --text-key with "
                                 f"the key that holds the document text")
            text = obj[text_key]
            if not isinstance(text, str):
                raise RetroError(f"{path}:{lineno}: '{text_key}' is {type(text).__name__}, not a string; "
                                 f"pass --text-key with the key that holds the document text")
            yield text


def _iter_parquet(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise RetroError(f"{path}: cannot read it as Parquet ({e}); pass a valid .parquet file") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise RetroError(f"{path}: no '{text_key}' column (columns: {', '.join(names[:8])}); pass --text-key "
                         f"with the column that holds the document text")
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        values = batch.column(0).to_pylist()
        for i, text in enumerate(values):
            if not isinstance(text, str):
                raise RetroError(f"{path}: row {row + i} of column '{text_key}' is "
                                 f"{'null' if text is None else type(text).__name__}, not text; clean the file "
                                 f"or pass --text-key with a string column")
        row += len(values)
        yield from values


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RetroError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or remove it from "
                         f"the input") from None


def iter_documents(path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one input path (file or directory) in a fixed order."""
    path = Path(path)
    if not path.exists():
        raise RetroError(f"{path}: input not found; pass existing JSONL, Parquet or text files or directories")
    for f in _files(path):
        kind = _kind(f)
        if kind == "jsonl":
            yield from _iter_jsonl(f, text_key)
        elif kind == "parquet":
            yield from _iter_parquet(f, text_key)
        else:
            yield _read_text(f)


def iter_inputs(inputs, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of several input paths, in the order given."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for p in inputs:
        if not Path(p).exists():  # fail before reading anything
            raise RetroError(f"{p}: input not found; pass existing JSONL, Parquet or text files or directories")
    for p in inputs:
        yield from iter_documents(p, text_key)


def _batches(it, size: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_documents(tok, texts: list[str], dtype, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` with EOD appended, skipping empty documents: (flat tokens of ``dtype``, lengths)."""
    flats, lens = [], []
    for i in range(0, len(texts), batch_size):
        flat, lengths = tok.encode_flat(texts[i:i + batch_size])
        keep = lengths > 0
        flats.append(np.insert(flat, np.cumsum(lengths)[keep], tok.eod_id).astype(dtype, copy=False))
        lens.append(lengths[keep] + 1)
    if not flats:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(lens)


_WORKER_TOKENIZERS: dict = {}


def _tokenize_shard(tok_box: list, texts: list[str], dtype, batch_size: int):
    """Ray task body: the tokenizer travels once per worker process (cached by its object id)."""
    import ray

    key = tok_box[0].hex()
    if key not in _WORKER_TOKENIZERS:
        os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")  # one task per CPU: keep Rust's pool to one thread
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        _WORKER_TOKENIZERS.clear()
        _WORKER_TOKENIZERS[key] = ray.get(tok_box[0])
    return tokenize_documents(_WORKER_TOKENIZERS[key], texts, dtype, batch_size)


def preprocess(inputs, output_prefix, tokenizer_spec: str, text_key: str = "text", workers: int = 1,
               batch_size: int = 1000, progress: bool = True, address: str | None = None,
               shard_docs: int | None = None) -> dict:
    """Tokenize documents into ``output_prefix.bin``/``.idx`` (one sequence per document, EOD appended).

    ``workers > 1`` tokenizes shards of ``shard_docs`` documents in Ray tasks (joining ``address`` or starting
    a local Ray); the output bytes do not depend on ``workers``, ``batch_size`` or ``shard_docs``.
    Returns ``{"docs", "tokens", "skipped_empty", "seconds", "dtype", "vocab_size", "eod_id", "prefix"}``.
    """
    from tqdm import tqdm

    from retro_pipeline.corpus import IndexedDatasetWriter, best_dtype
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    t0 = time.perf_counter()
    tok = load_gpt_tokenizer(str(tokenizer_spec))
    dtype = np.dtype(best_dtype(tok.vocab_size))
    eod = tok.eod_id  # fails early if the tokenizer has none
    docs = iter_inputs(inputs, text_key)
    shard_docs = shard_docs or max(batch_size, 1) * 4
    n_in = n_tok = 0

    def write(writer, flat, lengths, n_texts):
        nonlocal n_in, n_tok
        writer.add_flat(flat, lengths)
        n_in += n_texts
        n_tok += flat.size
        bar.update(n_texts)
        bar.set_postfix(tokens=n_tok, tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)

    with tqdm(desc="preprocess", unit="doc", disable=not progress, dynamic_ncols=True) as bar, \
            IndexedDatasetWriter(output_prefix, dtype) as writer:
        if workers <= 1:
            for texts in _batches(docs, max(batch_size, 1)):
                write(writer, *tokenize_documents(tok, texts, dtype, batch_size), len(texts))
        else:
            from retro_pipeline.executor.ray import ensure_ray

            ray = ensure_ray(address=address)
            task = ray.remote(num_cpus=1)(_tokenize_shard)
            box = [ray.put(tok)]
            pending: deque = deque()
            for texts in _batches(docs, shard_docs):
                pending.append((task.remote(box, texts, dtype, batch_size), len(texts)))
                if len(pending) >= 2 * workers:
                    ref, n = pending.popleft()
                    write(writer, *ray.get(ref), n)
            while pending:
                ref, n = pending.popleft()
                write(writer, *ray.get(ref), n)
        if len(writer) == 0:
            shown = ", ".join(map(str, [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs))
            raise RetroError(f"preprocess: no non-empty documents in {shown} (text key '{text_key}'); pass "
                             f"inputs that hold some text")
    stats = {"prefix": writer.prefix, "docs": len(writer), "skipped_empty": n_in - len(writer), "tokens": n_tok,
             "seconds": round(time.perf_counter() - t0, 3), "dtype": dtype.name, "vocab_size": tok.vocab_size,
             "eod_id": eod}
    return stats
