"""GPT/embedder tokenizer loading, the fast byte-level detokenizer, and tokenizer training."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from retro_pipeline.errors import RetroError
from embedder.settings import default_model_path
from retro_pipeline.errors import UserError
from retro_pipeline.tokenizers import (GPTTokenizer, _byte_decoder, _gpt2_files, load_embedder_tokenizer,
                                       load_gpt_tokenizer, train_tokenizer)

MIXED_TEXT = ["Hello world, naïve café — 日本語のテキスト 🙂🚀 Ünïcödé", "x" * 10, "", "\u00e9\u0301 ﷽ 𝔘𝔫𝔦"]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from retro_pipeline.demo import demo_text_documents

    path = tmp_path_factory.mktemp("train") / "docs.jsonl"
    docs = demo_text_documents()[:150] + MIXED_TEXT * 20
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


@pytest.fixture(scope="module")
def trained_bpe(train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer([train_file], out, vocab_size=600, kind="bpe")
    return out


def test_gpt2_is_the_real_gpt2():
    tok = load_gpt_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eod_id == 50256
    assert [t.tolist() for t in tok.encode_batch(["Hello world", ""])] == [[15496, 995], []]
    assert tok.encode_batch(["a<|endoftext|>b"])[0].tolist() == [64, 50256, 65]
    assert tok.decode([15496, 995, 50256]) == "Hello world"
    assert load_gpt_tokenizer("gpt2") is tok  # cached per process
    assert pickle.loads(pickle.dumps(tok)).encode_batch(["Hello"])[0].tolist() == [15496]


def test_gpt2_directories_and_files(tmp_path):
    encoder, vocab_bpe = _gpt2_files()
    (tmp_path / "openai").mkdir()
    shutil.copy(encoder, tmp_path / "openai" / "encoder.json")
    shutil.copy(vocab_bpe, tmp_path / "openai" / "vocab.bpe")
    (tmp_path / "hf").mkdir()
    shutil.copy(encoder, tmp_path / "hf" / "vocab.json")
    shutil.copy(vocab_bpe, tmp_path / "hf" / "merges.txt")
    ref = load_gpt_tokenizer("gpt2")
    ref.tokenizer.save(str(tmp_path / "tokenizer.json"))
    text = ["Retrieval-enhanced transformers<|endoftext|> café"]
    for spec in (tmp_path / "openai", tmp_path / "hf", tmp_path / "tokenizer.json", tmp_path):
        tok = load_gpt_tokenizer(str(spec))
        assert tok.eod_id == 50256 and tok.vocab_size == 50257
        assert tok.encode_batch(text)[0].tolist() == ref.encode_batch(text)[0].tolist()
        assert tok.decode([50256, 40304]) == " café"


def test_unknown_tokenizer_errors(tmp_path):
    with pytest.raises(RetroError, match="no such file or directory; pass a tokenizer.json, a directory, or 'gpt2'"):
        load_gpt_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(RetroError, match="bad.json"):
        load_gpt_tokenizer(str(bad))


def _no_transformers_call(monkeypatch):
    import transformers

    def fail(*a, **k):
        raise AssertionError("the hub was tried although it cannot be reached")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)


@pytest.mark.parametrize("offline", ["env", "endpoint"])
def test_unreachable_hub_fails_at_once(monkeypatch, offline):
    if offline == "endpoint":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    _no_transformers_call(monkeypatch)
    reason = "HF_HUB_OFFLINE=1 is set" if offline == "env" else "127.0.0.1:9 does not answer"
    with pytest.raises(RetroError) as e:
        load_gpt_tokenizer("gpt-2")
    msg = str(e.value)
    assert msg.startswith("tokenizer 'gpt-2' is not a file or directory, and the Hugging Face hub cannot be "
                          "reached to fetch it (") and reason in msg
    assert msg.endswith("; pass a tokenizer.json, a directory, or 'gpt2' for the packaged GPT-2 BPE")
    with pytest.raises(UserError) as e:  # the embedder's tokenizer: the fix is the packaged model, not gpt2
        load_embedder_tokenizer("some-org/some-bert")
    assert "'some-org/some-bert'" in str(e.value) and reason in str(e.value) and "gpt2" not in str(e.value)
    assert "leave --embedder out for the packaged all-MiniLM-L6-v2" in str(e.value)


def test_hub_in_local_cache_is_not_checked(monkeypatch):
    import embedder.settings as S
    import transformers

    class Backend:
        backend_tokenizer = "from the cache"

    monkeypatch.setattr(S, "in_hub_cache", lambda spec: spec == "org/cached")
    monkeypatch.setattr(S, "hub_problem", lambda *a: pytest.fail("hub checked for a cached id"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda spec: Backend())
    from retro_pipeline.tokenizers import _load_tokenizer_object

    assert _load_tokenizer_object("org/cached", "tokenizer") == "from the cache"


def test_hub_failure_keeps_the_whole_first_line(monkeypatch):
    import embedder.settings as S
    import transformers

    first = ("gpt-2 is not a local folder and is not a valid model identifier listed on "
             "'https://huggingface.co/models/some/really/long/path/that/goes/on/and/on/past/two/hundred/characters"
             "/of/message/text/so/that/a/cut/at/a/character/count/would/lose/the/end/of/it'")
    monkeypatch.setattr(S, "in_hub_cache", lambda spec: False)
    monkeypatch.setattr(S, "hub_problem", lambda *a: None)

    def fail(spec):
        raise OSError(first + "\nIf this is a private repository, make sure to pass a token")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(RetroError) as e:
        load_gpt_tokenizer("gpt-2")
    msg = str(e.value)
    assert f"(OSError: {first});" in msg and "\n" not in msg and "private repository" not in msg
    assert msg.endswith("or 'gpt2' for the packaged GPT-2 BPE")
    with pytest.raises(RetroError) as e:
        load_embedder_tokenizer("gpt-2")
    assert first in str(e.value) and "leave --embedder out for the packaged all-MiniLM-L6-v2" in str(e.value)


def test_embedder_tokenizer_specs(monkeypatch, tmp_path):
    _no_transformers_call(monkeypatch)
    import retro_pipeline.tokenizers as T

    assert not hasattr(T, "default_embedder_path")  # one default-model lookup: embedder.settings
    packaged = load_embedder_tokenizer("sentence-transformers/all-MiniLM-L6-v2")  # offline: the packaged copy
    assert packaged.encode("Hello world", add_special_tokens=False).ids == [7592, 2088]
    with pytest.raises(RetroError) as e:
        load_embedder_tokenizer(tmp_path / "nope" / "tokenizer.json")
    assert "no such file or directory" in str(e.value) and "gpt2" not in str(e.value)
    assert "leave --embedder out" in str(e.value)


def test_missing_eod(tmp_path):
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(RetroError, match="no end-of-document token"):
        GPTTokenizer(tok, "tiny").eod_id


def _random_chunks(tok: GPTTokenizer, rng, n_chunks=1500, max_len=40):
    """Chunks of random ids mixing whole-vocabulary ids, single-byte tokens (which split multi-byte
    characters), special and out-of-range ids, and slices of real multilingual text cut anywhere."""
    byte_ids = [tok.tokenizer.token_to_id(c) for c in _byte_decoder()]
    byte_ids = np.array([i for i in byte_ids if i is not None] or [0], dtype=np.int64)
    real = np.concatenate(tok.encode_batch(MIXED_TEXT * 3))
    pools = [np.arange(tok.vocab_size), byte_ids, np.array([tok.eod_id, tok.vocab_size + 5])]
    chunks = []
    for _ in range(n_chunks):
        n = int(rng.integers(0, max_len))
        if rng.random() < 0.3:
            start = int(rng.integers(0, len(real)))
            chunks.append(real[start:start + n])
        else:
            which = rng.choice(3, size=n, p=[0.4, 0.55, 0.05])
            chunks.append(np.array([rng.choice(pools[w]) for w in which], dtype=np.int64))
    return chunks


def _check_detok(tok: GPTTokenizer, chunks, dtype=np.int64):
    flat = np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
    expect = tok.decode_batch([flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    assert tok.detokenize_flat(flat, bounds) == expect
    pairs = np.stack([bounds[:-1], bounds[1:]], axis=1)[::-1].copy()  # (start, end) rows, any order
    assert tok.detokenize_flat(flat, pairs) == expect[::-1]


def test_detokenize_flat_gpt2_property():
    tok = load_gpt_tokenizer("gpt2")
    rng = np.random.default_rng(1234)
    chunks = _random_chunks(tok, rng)
    _check_detok(tok, chunks, np.int64)
    _check_detok(tok, chunks, np.uint16)  # corpus dtype; out-of-range ids are skipped like decode does
    assert tok.detokenize_flat(np.zeros(0, np.uint16), np.array([0])) == []


def test_detokenize_flat_small_gather_steps(monkeypatch):
    import retro_pipeline.tokenizers as T

    monkeypatch.setattr(T, "_GATHER", 7)
    tok = load_gpt_tokenizer("gpt2")
    _check_detok(tok, _random_chunks(tok, np.random.default_rng(5), n_chunks=200))


def test_detokenize_flat_trained_byte_level_bpe(trained_bpe):
    import tokenizers

    tok = GPTTokenizer(tokenizers.Tokenizer.from_file(str(trained_bpe / "tokenizer.json")), "trained")
    assert tok.eod_id == tok.tokenizer.token_to_id("<|endoftext|>")
    _check_detok(tok, _random_chunks(tok, np.random.default_rng(7)))
    # a non-special added token: decode splices it in verbatim; those chunks take the exact slow path
    tok.tokenizer.add_tokens(["ADDED"])
    tok._table = None
    added = tok.tokenizer.token_to_id("ADDED")
    chunks = _random_chunks(tok, np.random.default_rng(8), n_chunks=300)
    chunks = [np.concatenate([c[:3], [added], c[3:]]) if i % 3 == 0 else c for i, c in enumerate(chunks)]
    _check_detok(tok, chunks)


def test_detokenize_flat_falls_back_for_other_decoders(train_file, tmp_path):
    train_tokenizer([train_file], tmp_path, vocab_size=500, kind="sentencepiece")
    tok = load_gpt_tokenizer(str(tmp_path))
    assert tok._byte_table() is None
    _check_detok(tok, _random_chunks(tok, np.random.default_rng(3), n_chunks=200))


def test_embedder_tokenizer_default():
    tok = load_embedder_tokenizer()
    assert (Path(default_model_path()) / "tokenizer.json").is_file()
    assert tok.truncation is None and tok.padding is None
    ids = tok.encode("Hello world", add_special_tokens=False).ids
    assert ids == [7592, 2088] and tok.encode("Hello world").ids == [101, 7592, 2088, 102]
    assert len(tok.encode("word " * 1000, add_special_tokens=False).ids) == 1000


def test_train_bpe(trained_bpe):
    tok = load_gpt_tokenizer(str(trained_bpe / "tokenizer.json"))
    assert 300 <= tok.vocab_size <= 600
    ids = tok.encode_batch(MIXED_TEXT[:1])[0]
    assert tok.decode(ids) == MIXED_TEXT[0]  # byte-level: lossless
    assert tok.decode([tok.eod_id]) == ""


def test_train_wordpiece(train_file, tmp_path):
    import transformers

    path = train_tokenizer([train_file], tmp_path, vocab_size=800, kind="wordpiece")
    assert path == tmp_path / "tokenizer.json"
    vocab = (tmp_path / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    enc = hf("the module")["input_ids"]
    assert enc[0] == vocab.index("[CLS]") and enc[-1] == vocab.index("[SEP]")
    emb = load_embedder_tokenizer(tmp_path)
    assert emb.encode("the module").ids == enc
    assert load_gpt_tokenizer(str(tmp_path)).eod_id == vocab.index("[SEP]")


def test_train_sentencepiece(train_file, tmp_path):
    train_tokenizer([train_file], tmp_path, vocab_size=500, kind="sentencepiece")
    tok = load_gpt_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eod_id == tok.tokenizer.token_to_id("</s>")
    assert tok.decode(tok.encode_batch(["the module"])[0]) == "the module"


def test_train_tokenizer_errors(train_file, tmp_path):
    with pytest.raises(RetroError, match="unknown tokenizer kind"):
        train_tokenizer([train_file], tmp_path, vocab_size=500, kind="unigramx")
    with pytest.raises(RetroError, match="too small"):
        train_tokenizer([train_file], tmp_path, vocab_size=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetroError, match="no documents"):
        train_tokenizer([tmp_path / "empty"], tmp_path / "out", vocab_size=500)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "readme.txt").write_text("no tokenizer here")
    with pytest.raises(RetroError, match="has no tokenizer.json"):
        load_gpt_tokenizer(str(tmp_path))
