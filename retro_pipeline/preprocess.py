"""Raw text → Megatron indexed dataset: read documents, tokenize in batches, append EOD, write atomically.

Inputs are read by :mod:`retro_pipeline.inputs`: JSONL, Parquet, plain text files (one file = one document)
and directories of them. Documents that tokenize to nothing are skipped, as Megatron's preprocess_data.py
does, and counted (``skipped_empty``, with a warning).

With ``workers > 1`` the driver cuts the document stream into consecutive shards and tokenizes them in Ray
tasks, writing the results back in shard order: the output is byte-identical for any worker count. An input
of fewer than two shards is tokenized in this process: starting Ray would cost more than it saves.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from typing import Iterator

import numpy as np

from retro_pipeline import arrays
from retro_pipeline.errors import RetroError
from retro_pipeline.inputs import Inputs

log = logging.getLogger(__name__)


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
        flats.append(np.insert(flat, arrays.offsets(lengths)[1:][keep], tok.eod_id).astype(dtype, copy=False))
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
    a local Ray) when the input has at least two shards; the output bytes do not depend on ``workers``,
    ``batch_size`` or ``shard_docs``. The progress bar counts input bytes.
    Returns ``{"docs", "tokens", "skipped_empty", "seconds", "dtype", "vocab_size", "eod_id", "prefix"}``.
    """
    from tqdm import tqdm

    from retro_pipeline.corpus import IndexedDatasetWriter, best_dtype
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    for name, value in (("workers", workers), ("batch_size", batch_size), ("shard_docs", shard_docs or 1)):
        if int(value) < 1:
            raise RetroError(f"preprocess: {name}={value} must be at least 1")
    t0 = time.perf_counter()
    tok = load_gpt_tokenizer(str(tokenizer_spec))
    dtype = np.dtype(best_dtype(tok.vocab_size))
    eod = tok.eod_id  # fails early if the tokenizer has none
    reader = Inputs(inputs, text_key)
    docs = ((text, reader.position) for text in reader)  # (text, input bytes consumed through it)
    shard_docs = shard_docs or batch_size * 4
    n_in = n_tok = 0

    def write(writer, flat, lengths, n_texts, position):
        nonlocal n_in, n_tok
        writer.add_flat(flat, lengths)
        n_in += n_texts
        n_tok += flat.size
        bar.update(max(position - bar.n, 0))
        bar.set_postfix(docs=n_in, tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)

    with IndexedDatasetWriter(output_prefix, dtype) as writer, \
            tqdm(desc="preprocess", total=reader.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                 disable=not progress, dynamic_ncols=True) as bar:
        head = list(itertools.islice(docs, 2 * shard_docs)) if workers > 1 else []
        if workers <= 1 or len(head) < 2 * shard_docs:
            if workers > 1:
                log.info("preprocess: %d documents are fewer than two shards of %d; tokenizing them in this "
                         "process instead of starting Ray workers", len(head), shard_docs)
            for batch in _batches(itertools.chain(head, docs), batch_size):
                texts = [t for t, _ in batch]
                write(writer, *tokenize_documents(tok, texts, dtype, batch_size), len(texts), batch[-1][1])
        else:
            from embedder.ray_session import ensure_ray

            ray = ensure_ray(address=address)
            task = ray.remote(num_cpus=1)(_tokenize_shard)
            box = [ray.put(tok)]
            pending: deque = deque()
            for shard in _batches(itertools.chain(head, docs), shard_docs):
                texts = [t for t, _ in shard]
                pending.append((task.remote(box, texts, dtype, batch_size), len(texts), shard[-1][1]))
                if len(pending) >= 2 * workers:
                    ref, n, position = pending.popleft()
                    write(writer, *ray.get(ref), n, position)
            while pending:
                ref, n, position = pending.popleft()
                write(writer, *ray.get(ref), n, position)
        if len(writer) == 0:
            shown = ", ".join(map(str, reader.paths))
            skipped = f"; {len(reader.skipped)} files of unknown kind were skipped" if reader.skipped else ""
            raise RetroError(f"preprocess: no non-empty documents in {shown} (text key '{text_key}'{skipped}); "
                             f"pass inputs that hold some text")
        bar.total = max(bar.total or 0, reader.position)
        bar.update(bar.total - bar.n)  # the bar ends at its total (reading ended after the last document)
    skipped_empty = n_in - len(writer)
    if skipped_empty:
        log.warning("preprocess: %d of %d input records were empty (they tokenize to nothing) and were skipped, "
                    "as Megatron's preprocess_data.py does", skipped_empty, n_in)
    return {"prefix": writer.prefix, "docs": len(writer), "skipped_empty": skipped_empty, "tokens": n_tok,
            "seconds": round(time.perf_counter() - t0, 3), "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "eod_id": eod}
