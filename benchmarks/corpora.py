"""Real-text corpora for the benchmarks, built offline from this Python's own files.

``stdlib_corpus(out_dir, min_tokens)``: the demo documents with sources (``build_demo_corpus(include_source=True)``:
pydoc topics, docstrings and 75 module sources, about 1.7M GPT-2 tokens), then every other ``.py`` file of the
standard library (sorted by path; tests, idlelib and site-packages left out), one document each, until the
corpus holds at least ``min_tokens`` tokens. Written once as ``<out_dir>/stdlib_<min_tokens>.bin/.idx`` and
reused; the same Python gives the same bytes.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_corpus(out_dir, min_tokens: int = 2_100_000) -> tuple[str, int, int]:
    """(prefix, documents, tokens) of a corpus of at least ``min_tokens`` GPT-2 tokens (see the module doc)."""
    from retro_pipeline.corpus import IndexedDataset, IndexedDatasetWriter, best_dtype
    from retro_pipeline.demo import demo_text_documents
    from retro_pipeline.preprocess import tokenize_documents
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    prefix = os.path.join(os.fspath(out_dir), f"stdlib_{min_tokens}")
    if os.path.exists(prefix + ".idx"):
        ds = IndexedDataset(prefix)
        return prefix, len(ds), int(ds.num_tokens)
    os.makedirs(out_dir, exist_ok=True)
    tok = load_gpt_tokenizer("gpt2")
    dtype = np.dtype(best_dtype(tok.vocab_size))
    docs = demo_text_documents(include_source=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    extra = sorted(p for p in lib.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(lib).parts[:-1]))
    tokens, n_docs = 0, 0
    tmp = prefix + ".tmp"
    with IndexedDatasetWriter(tmp, dtype) as writer:
        def add(texts):
            nonlocal tokens, n_docs
            flat, lengths = tokenize_documents(tok, texts, dtype)
            writer.add_flat(flat, lengths)
            tokens += int(np.sum(lengths))
            n_docs += len(lengths)
        for i in range(0, len(docs), 500):
            add(docs[i:i + 500])
        for path in extra:
            if tokens >= min_tokens:
                break
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) >= 200:
                add([f"# {path.relative_to(lib)}\n\n{text}"])
    if tokens < min_tokens:
        raise SystemExit(f"the standard library holds only {tokens} tokens; ask for fewer")
    for ext in (".bin", ".idx"):
        os.replace(tmp + ext, prefix + ext)
    return prefix, n_docs, tokens
