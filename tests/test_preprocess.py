"""preprocess: documents from JSONL / Parquet / text, tokenized with EOD into a Megatron indexed dataset."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from retro_pipeline.corpus import IndexedDataset
from retro_pipeline.errors import RetroError
from retro_pipeline.inputs import iter_documents, iter_inputs
from retro_pipeline.preprocess import preprocess
from retro_pipeline.tokenizers import load_gpt_tokenizer

TEXTS = ["Hello world", "Retrieval-enhanced transformers, café 日本", "a\nb\n\nc", "The end."]


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def expected_docs(texts):
    tok = load_gpt_tokenizer("gpt2")
    return [ids.tolist() + [tok.eod_id] for ids in tok.encode_batch(texts) if len(ids)]


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_jsonl(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    stats = preprocess([src], tmp_path / "out" / "c", "gpt2", progress=False)
    assert read_docs(tmp_path / "out" / "c") == expected_docs(TEXTS)
    assert read_docs(tmp_path / "out" / "c")[0] == [15496, 995, 50256]
    assert IndexedDataset(tmp_path / "out" / "c").dtype == np.uint16
    assert stats["docs"] == 4 and stats["tokens"] == sum(map(len, expected_docs(TEXTS)))
    assert stats["dtype"] == "uint16" and stats["eod_id"] == 50256 and stats["seconds"] >= 0


def test_parquet_gz_text_dir_and_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS[:2], "n": [1, 2]}), tmp_path / "a.parquet", row_group_size=1)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": TEXTS[2]}) + "\n\n")
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "y.txt").write_text(TEXTS[3])
    (d / "x.md").write_text(TEXTS[1])
    (d / ".hidden").write_text("skipped")
    single = tmp_path / "single.txt"
    single.write_text(TEXTS[0])
    inputs = [tmp_path / "a.parquet", tmp_path / "b.jsonl.gz", d, single]
    order = [*TEXTS[:3], TEXTS[3], TEXTS[1], TEXTS[0]]  # sorted paths: dir/sub/y.txt before dir/x.md
    assert list(iter_inputs(inputs, "body")) == order
    preprocess(inputs, tmp_path / "c", "gpt2", text_key="body", progress=True)
    assert read_docs(tmp_path / "c") == expected_docs(order)


def test_empty_documents_are_skipped(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ["", "x", ""])
    stats = preprocess([src], tmp_path / "c", "gpt2", progress=False)
    assert read_docs(tmp_path / "c") == [[87, 50256]] and stats["skipped_empty"] == 2


def test_int32_for_big_vocabularies(tmp_path):
    import tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab.update({"[UNK]": 70000, "<|endoftext|>": 70001})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "in.jsonl", ["w1 w69999 zzz"])
    stats = preprocess([src], tmp_path / "c", str(tmp_path / "tokenizer.json"), progress=False)
    assert stats["dtype"] == "int32" and IndexedDataset(tmp_path / "c").dtype == np.int32
    assert read_docs(tmp_path / "c") == [[1, 69999, 70000, 70001]]


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": broken}\n', r"in\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"in\.jsonl:3: no 'text' key \(found: body\).*--text-key"),
    ('{"text": 5}\n', r"in\.jsonl:1: 'text' is int, not a string"),
    ('["text"]\n', r"in\.jsonl:1: no 'text' key"),
])
def test_bad_jsonl(tmp_path, content, match):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(RetroError, match=match):
        preprocess([tmp_path / "in.jsonl"], tmp_path / "c", "gpt2", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # nothing left behind


def test_bad_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(RetroError, match="nowhere.jsonl: input not found"):
        preprocess([tmp_path / "nowhere.jsonl"], tmp_path / "c", "gpt2", progress=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(RetroError, match=r"a\.parquet: no 'text' column \(columns: body\)"):
        list(iter_documents(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(RetroError, match=r"n\.parquet: row 1 of column 'text' is null"):
        list(iter_documents(tmp_path / "n.parquet"))
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(RetroError, match=r"bin\.txt: not UTF-8"):
        list(iter_documents(tmp_path / "bin.txt"))


def test_empty_input_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "e.jsonl").write_text("")
    for src in (tmp_path / "empty", tmp_path / "e.jsonl"):
        with pytest.raises(RetroError, match="no non-empty documents"):
            preprocess([src], tmp_path / "out" / "c", "gpt2", progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_workers_give_identical_bytes(tmp_path, ray_session):
    from retro_pipeline.demo import demo_text_documents

    texts = demo_text_documents()[:120] + ["", "tail"]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    s1 = preprocess([src], tmp_path / "w1", "gpt2", workers=1, batch_size=16, progress=False)
    s2 = preprocess([src], tmp_path / "w2", "gpt2", workers=2, batch_size=8, shard_docs=13, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert s1["docs"] == s2["docs"] == 121 and s1["tokens"] == s2["tokens"]


def test_demo_corpus_is_deterministic_and_idempotent(tmp_path):
    from retro_pipeline.demo import build_demo_corpus, demo_text_documents

    texts = demo_text_documents()
    assert len(texts) > 500 and len(set(texts)) == len(texts) and texts == demo_text_documents()
    a = build_demo_corpus(tmp_path / "a", max_docs=60)
    b = build_demo_corpus(tmp_path / "b", max_docs=60)
    for ext in (".bin", ".idx"):
        assert open(a + ext, "rb").read() == open(b + ext, "rb").read()
    assert read_docs(a)[-1] == expected_docs([texts[59]])[0]
    mtime = os.stat(a + ".idx").st_mtime_ns
    assert build_demo_corpus(tmp_path / "a", max_docs=60) == a and os.stat(a + ".idx").st_mtime_ns == mtime


def test_small_input_with_workers_does_not_start_ray(tmp_path, monkeypatch):
    import embedder.ray_session as R

    texts = [f"document {i} " * (i % 5) for i in range(50)]  # some empty
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    s1 = preprocess([src], tmp_path / "w1", "gpt2", workers=1, batch_size=7, progress=False)
    monkeypatch.setattr(R, "ensure_ray", lambda *a, **k: pytest.fail("Ray started for a small input"))
    s4 = preprocess([src], tmp_path / "w4", "gpt2", workers=4, batch_size=7, shard_docs=30, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w4{ext}").read_bytes()
    assert s1["docs"] == s4["docs"] == 40 and s1["skipped_empty"] == s4["skipped_empty"] == 10


@pytest.fixture()
def bar_log(monkeypatch):
    """Every progress bar preprocess makes: its total and each position it reached."""
    import tqdm

    bars = []

    class Recorder(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen = []
            bars.append(self)

        def update(self, n=1):
            super().update(n)
            self.seen.append(self.n)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    return bars


def test_progress_counts_input_bytes_to_the_total(tmp_path, bar_log, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"text number {i} " * (1 + i % 7) for i in range(300)]
    write_jsonl(tmp_path / "a.jsonl", texts[:100])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[100:200]) + "\n\n")
    pq.write_table(pa.table({"text": texts[200:290]}), tmp_path / "c.parquet", row_group_size=30)
    d = tmp_path / "dir"
    d.mkdir()
    for i, t in enumerate(texts[290:]):
        (d / f"{i}.txt").write_text(t)
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet", d]
    total = sum(os.path.getsize(p) for p in inputs[:3]) + sum(p.stat().st_size for p in d.iterdir())
    for workers, shard in ((1, None), (2, 40)):
        preprocess(inputs, tmp_path / f"out{workers}", "gpt2", workers=workers, batch_size=16, shard_docs=shard,
                   progress=True)
        bar = bar_log[-1]
        assert bar.total == total and bar.n == total and bar.unit == "B"
        assert len(bar.seen) > 3 and bar.seen == sorted(bar.seen) and max(bar.seen) <= total
    assert (tmp_path / "out1.bin").read_bytes() == (tmp_path / "out2.bin").read_bytes()


def test_inputs_position_and_kinds(tmp_path, corpus_texts):
    from retro_pipeline.inputs import Inputs

    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "a.ndjson", corpus_texts[:30])
    (d / "b.rst").write_text("rst text")
    (d / "c.csv").write_text("x,y")
    reader = Inputs([d])
    assert [p.name for p, _, _ in reader.files] == ["a.ndjson", "b.rst"] and [p.name for p in reader.skipped] == [
        "c.csv"]
    positions = []
    for _ in reader:
        positions.append(reader.position)
    assert len(positions) == 31 and positions == sorted(positions) and positions[-1] == reader.total_bytes
    assert positions[0] == len((d / "a.ndjson").read_bytes().split(b"\n")[0]) + 1
    assert list(iter_inputs([d / "c.csv"])) == ["x,y"]  # named directly: read whatever the suffix
