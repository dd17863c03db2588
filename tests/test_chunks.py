"""Bulk chunking and the cached BERT token counter against plain per-chunk computations."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers

from retro_pipeline.chunks import BertLengths, chunk_spans, chunk_texts, doc_lengths_without_eod


def test_chunk_spans_match_range_loop():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[0, 1, 15, 16, 17, 32, 33], rng.integers(0, 100, 50)])
    doc, start, end = chunk_spans(lengths, 16)
    want = [(d, s, min(s + 16, n)) for d, n in enumerate(lengths) for s in range(0, n, 16)]
    assert list(zip(doc.tolist(), start.tolist(), end.tolist())) == want


def test_eod_dropped_once_and_only_at_the_end():
    tokens = np.array([5, 9, 9, 0, 9, 7, 9, 9])  # docs: [5,9] [9] [] [0,9] [7,9,9]  (eod = 9)
    offsets = np.array([0, 2, 3, 3, 5, 8])
    np.testing.assert_array_equal(doc_lengths_without_eod(tokens, offsets, 9), [1, 0, 0, 1, 2])


def test_chunk_texts_equal_per_chunk_decode(gpt_tokenizer_path, corpus_texts):
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    tokens = np.concatenate(gpt.encode_batch(corpus_texts[:5]))
    rng = np.random.default_rng(2)
    starts = rng.integers(0, len(tokens) - 70, 300)
    lengths = rng.integers(0, 65, 300)
    want = [gpt.tokenizer.decode(tokens[s:s + n].tolist()) for s, n in zip(starts, lengths)]
    assert chunk_texts(gpt, tokens, starts, lengths) == want


def edge_texts(corpus_texts):
    rng = np.random.default_rng(1)
    big = "\n".join(corpus_texts)
    texts = []
    for _ in range(3000):
        i = int(rng.integers(0, len(big) - 400))
        texts.append(big[i:i + int(rng.integers(0, 300))])
    texts += ["", "   ", "\n\t\r", "[CLS] a [SEP]", "x [mask] y", "[PAD][UNK]", "caf\u00e9 na\u00efve", "\x05ab\x05cd",
              "a\x01b", "Hello,World!!", "DON'T", "x" * 150 + " short", "\u4e2d\u6587 text", "tab\x0bvt",
              "\x7fdel", "\ufffd", "e\u0301", "Ünïcödé ÀÉÎ", "1,000.50$", "`~^_|\\"]
    return texts


@pytest.mark.parametrize("which", ["minilm", "trained-cased"])
def test_bert_lengths_equal_rust_tokenizer(which, corpus_texts, tmp_path):
    if which == "minilm":
        from retro_pipeline.tokenizers import load_embedder_tokenizer

        tok = load_embedder_tokenizer(None)
    else:
        w = tokenizers.BertWordPieceTokenizer(lowercase=False, strip_accents=False)
        w.train_from_iterator(corpus_texts[:80], vocab_size=600, show_progress=False)
        tok = tokenizers.Tokenizer.from_str(w._tokenizer.to_str())
    counter = BertLengths(tok)
    assert counter.fast
    texts = edge_texts(corpus_texts)
    want = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    assert counter(texts).tolist() == want
    assert counter(texts).tolist() == want  # again, now from the word cache
    assert counter([]).tolist() == []


def test_other_tokenizers_use_rust_directly(corpus_texts):
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_texts[:50], vocab_size=500, show_progress=False)
    tok = tokenizers.Tokenizer.from_str(bpe._tokenizer.to_str())
    counter = BertLengths(tok)
    assert not counter.fast
    texts = edge_texts(corpus_texts)[:200]
    assert counter(texts).tolist() == [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]


def test_offsets_are_the_one_cumulative_sum():
    import pathlib
    import re

    import retro_pipeline
    from retro_pipeline.arrays import offsets

    assert offsets([]).tolist() == [0] and offsets([]).dtype == np.int64
    assert offsets([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert offsets(np.array([True, False, True])).tolist() == [0, 1, 1, 2]
    big = np.full(3, 2**31, dtype=np.uint32)
    assert offsets(big)[-1] == 3 * 2**31  # no overflow of narrow dtypes
    root = pathlib.Path(retro_pipeline.__file__).parent
    for name in ("corpus.py", "chunks.py", "tokenizers.py", "preprocess.py", "inputs.py"):
        src = (root / name).read_text()
        assert not re.search(r"\bcumsum\b", src), f"{name} has its own cumulative sum; use arrays.offsets"
