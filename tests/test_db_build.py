"""db-build against a brute-force reference, the split modes, blends, resume and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from helpers import edge_case_docs, read_h5, reference_block
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import write_indexed_dataset
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

CL = 16  # a short chunk length makes many chunks from little text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gpt_tokenizer_path, corpus_texts):
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    docs = edge_case_docs(gpt, corpus_texts[:40], CL, n_docs=70)
    prefix = str(tmp_path_factory.mktemp("corpus") / "edge")
    write_indexed_dataset(prefix, docs, np.uint16)
    return prefix, docs


def build(workdir, prefix, gpt_path, bert_dir, executor="local", **opts):
    given = {"data_path": prefix if isinstance(prefix, list) else ["1", prefix], "gpt_tokenizer": gpt_path,
             "embedder": bert_dir, "chunk_length": CL, "block_size": 16, **opts}
    return run_stages(str(workdir), ["db-build"], given, RunOptions(executor=executor, progress=False))


def test_blocks_equal_reference(tmp_path, corpus, gpt_tokenizer_path, bert_dir):
    prefix, docs = corpus
    build(tmp_path, prefix, gpt_tokenizer_path, bert_dir)
    gpt_tok = tokenizers.Tokenizer.from_file(gpt_tokenizer_path)
    bert_tok = tokenizers.Tokenizer.from_file(str(Path(bert_dir) / "tokenizer.json"))
    eod = gpt_tok.token_to_id("<|endoftext|>")
    files = sorted((tmp_path / "db" / "individual" / "edge").glob("*.hdf5"))
    assert [f.name for f in files] == ["%02d-%02d.hdf5" % (s, min(s + 16, 70)) for s in range(0, 70, 16)]
    n_invalid = 0
    for f in files:
        s, e = (int(x) for x in f.stem.split("-"))
        got = read_h5(f)
        want_valid, want_invalid, want_offsets = reference_block(gpt_tok, bert_tok, docs, (s, e), CL, eod)
        np.testing.assert_array_equal(got["chunks_valid"], want_valid)
        np.testing.assert_array_equal(got["chunks_invalid"], want_invalid)
        np.testing.assert_array_equal(got["doc_offsets"], want_offsets)
        assert got["chunks_valid"].dtype == np.uint32 and got["doc_offsets"].dtype == np.uint64
        n_invalid += len(want_invalid)
    assert n_invalid >= 4  # the whitespace-only chunks are there and were classified invalid


def test_megatron_split_is_document_order_and_first_n(tmp_path, corpus, gpt_tokenizer_path, bert_dir):
    prefix, docs = corpus
    build(tmp_path, prefix, gpt_tokenizer_path, bert_dir, split_mode="megatron", split="90,10,0", index_ntrain="50")
    blocks = sorted((tmp_path / "db" / "individual" / "edge").glob("*.hdf5"))
    every = np.concatenate([read_h5(b)["chunks_valid"] for b in blocks])
    n_docs_train = int(0.9 * 70)
    want_train = every[every[:, 0] < n_docs_train]
    train, sampled, valid = (read_h5(tmp_path / "db" / "merged" / f"{n}.hdf5") for n in ("train", "sampled", "valid"))
    np.testing.assert_array_equal(train["chunks"][:, 1:], want_train)
    assert (train["chunks"][:, 0] == 0).all()
    np.testing.assert_array_equal(valid["chunks"][:, 1:], every[every[:, 0] >= n_docs_train])
    np.testing.assert_array_equal(sampled["chunks"], train["chunks"][:50])
    assert train["n_written"][0] == len(want_train) and sampled["n_written"][0] == 50
    # doc_offsets: one row per train document, cumulative chunk ends.
    counts = np.bincount(want_train[:, 0].astype(np.int64), minlength=n_docs_train)
    np.testing.assert_array_equal(train["doc_offsets"][:, 1], np.arange(n_docs_train))
    np.testing.assert_array_equal(train["doc_offsets"][:, 2], np.cumsum(counts))
    infos = json.loads((tmp_path / "db" / "indexed_dataset_infos.json").read_text())
    assert infos == [{"ratio": 1.0, "prefix": prefix, "n_docs": 70, "n_docs_train": n_docs_train,
                      "n_chunks": len(every), "n_chunks_train": len(want_train),
                      "n_chunks_invalid": sum(len(read_h5(b)["chunks_invalid"]) for b in blocks),
                      "n_chunks_sampled": 50}]


def test_random_split_properties(tmp_path, corpus, gpt_tokenizer_path, bert_dir):
    prefix, docs = corpus
    build(tmp_path / "a", prefix, gpt_tokenizer_path, bert_dir, split="80,20,0",
          index_ntrain="40", seed=7, split_mode="random")
    train, sampled, valid = (read_h5(tmp_path / "a" / "db" / "merged" / f"{n}.hdf5")
                             for n in ("train", "sampled", "valid"))
    train_docs = set(train["chunks"][:, 1].tolist())
    valid_docs = set(valid["chunks"][:, 1].tolist())
    assert not train_docs & valid_docs
    assert len(train["doc_offsets"]) == int(0.8 * 70)  # exactly the requested number of train documents
    assert set(train["doc_offsets"][:, 1].tolist()) >= train_docs
    assert train_docs != set(range(len(train_docs)))  # not simply the first documents
    rows = sampled["train_rows"].astype(np.int64)
    assert len(rows) == 40 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(sampled["chunks"], train["chunks"][rows])
    # chunks of a document stay in order and together; every valid chunk is in train or valid
    both = np.concatenate([train["chunks"], valid["chunks"]])
    assert len(np.unique(both[:, 1:3], axis=0)) == len(both)
    # the same seed gives the same bytes; another seed another split
    build(tmp_path / "b", prefix, gpt_tokenizer_path, bert_dir, split="80,20,0",
          index_ntrain="40", seed=7, split_mode="random")
    build(tmp_path / "c", prefix, gpt_tokenizer_path, bert_dir, split="80,20,0",
          index_ntrain="40", seed=8, split_mode="random")
    same = (tmp_path / "b" / "db" / "merged" / "train.hdf5").read_bytes()
    assert same == (tmp_path / "a" / "db" / "merged" / "train.hdf5").read_bytes()
    other = read_h5(tmp_path / "c" / "db" / "merged" / "train.hdf5")
    assert set(other["chunks"][:, 1].tolist()) != train_docs


def test_blend_sets_dataset_index(tmp_path, corpus, gpt_tokenizer_path, bert_dir, corpus_texts):
    prefix, docs = corpus
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    other_docs = [np.append(t, gpt.eod_id) for t in gpt.encode_batch(corpus_texts[40:60])]
    other = str(tmp_path / "other")
    write_indexed_dataset(other, other_docs, np.uint16)
    build(tmp_path / "w", ["0.3", prefix, "0.7", other], gpt_tokenizer_path, bert_dir, split_mode="megatron",
          split="100,0,0", index_ntrain="100")
    train = read_h5(tmp_path / "w" / "db" / "merged" / "train.hdf5")
    infos = json.loads((tmp_path / "w" / "db" / "indexed_dataset_infos.json").read_text())
    n0 = infos[0]["n_chunks_train"]
    assert (train["chunks"][:n0, 0] == 0).all() and (train["chunks"][n0:, 0] == 1).all()
    assert [d["n_chunks_sampled"] for d in infos] == [30, 70]
    gpt_tok = tokenizers.Tokenizer.from_file(gpt_tokenizer_path)
    bert_tok = tokenizers.Tokenizer.from_file(str(Path(bert_dir) / "tokenizer.json"))
    want, _, _ = reference_block(gpt_tok, bert_tok, other_docs, (0, len(other_docs)), CL, gpt.eod_id)
    np.testing.assert_array_equal(train["chunks"][n0:, 1:], want)
    assert train["doc_offsets"][-1, 2] == len(train["chunks"])
    assert (train["doc_offsets"][:70, 0] == 0).all() and (train["doc_offsets"][70:, 0] == 1).all()


def test_ray_and_local_give_identical_bytes_and_resume(tmp_path, corpus, gpt_tokenizer_path, bert_dir, ray_session):
    prefix, _ = corpus
    build(tmp_path / "local", prefix, gpt_tokenizer_path, bert_dir)
    out = build(tmp_path / "ray", prefix, gpt_tokenizer_path, bert_dir, executor="ray")
    assert out["db-build"]["blocks_run"] == 5
    for name in ("train", "sampled", "valid"):
        a = (tmp_path / "local" / "db" / "merged" / f"{name}.hdf5").read_bytes()
        b = (tmp_path / "ray" / "db" / "merged" / f"{name}.hdf5").read_bytes()
        assert a == b, name
    # a finished build does nothing on a rerun; losing merged files and two blocks recomputes only those
    (tmp_path / "ray" / "db" / "merged" / "train.hdf5").unlink()
    for p in sorted((tmp_path / "ray" / "db" / "individual" / "edge").glob("*.hdf5"))[:2]:
        p.unlink()
    out = build(tmp_path / "ray", prefix, gpt_tokenizer_path, bert_dir, executor="ray")
    assert out["db-build"]["blocks_run"] == 2
    assert (tmp_path / "ray" / "db" / "merged" / "train.hdf5").read_bytes() == \
        (tmp_path / "local" / "db" / "merged" / "train.hdf5").read_bytes()


def test_crash_in_the_middle_then_resume(tmp_path, corpus, gpt_tokenizer_path, bert_dir, monkeypatch):
    """An exception after a few blocks (a crash), then a rerun: same bytes as an uninterrupted build."""
    from retro_pipeline.stages import db as dbmod

    prefix, _ = corpus
    build(tmp_path / "clean", prefix, gpt_tokenizer_path, bert_dir)
    real = dbmod.DBBuildStage.process
    calls = {"n": 0}

    def dying(self, block, state):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # not retried, like a kill
        return real(self, block, state)

    monkeypatch.setattr(dbmod.DBBuildStage, "process", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "crash", prefix, gpt_tokenizer_path, bert_dir)
    assert not (tmp_path / "crash" / "db" / "merged" / "train.hdf5").exists()
    monkeypatch.setattr(dbmod.DBBuildStage, "process", real)
    out = build(tmp_path / "crash", prefix, gpt_tokenizer_path, bert_dir)
    assert out["db-build"]["blocks_run"] == 3
    for name in ("train", "sampled", "valid"):
        assert (tmp_path / "crash" / "db" / "merged" / f"{name}.hdf5").read_bytes() == \
            (tmp_path / "clean" / "db" / "merged" / f"{name}.hdf5").read_bytes()


def test_merge_memory_does_not_grow_with_the_corpus(tmp_path, gpt_tokenizer_path, bert_dir, corpus_texts):
    """finalize streams block by block: a 12x larger corpus (same block size) needs no more merge memory."""
    import tracemalloc

    from retro_pipeline.executor.base import block_is_done
    from retro_pipeline.pipeline import load_config
    from retro_pipeline.stages.db import DBBuildStage
    from retro_pipeline.workdir import Workdir

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    docs = edge_case_docs(gpt, corpus_texts[:60], CL, n_docs=150, seed=5)
    peaks, rows = {}, {}
    for copies in (2, 24):
        prefix = str(tmp_path / f"c{copies}")
        write_indexed_dataset(prefix, docs * copies, np.uint16)
        wd = tmp_path / f"w{copies}"
        build(wd, prefix, gpt_tokenizer_path, bert_dir, block_size=32, index_ntrain="200")
        stage = DBBuildStage(Workdir(wd), load_config(str(wd)))
        blocks = stage.plan()
        assert {b.size for b in blocks[:-1]} == {32}
        results = {b.name: block_is_done(Workdir(wd).block_marker("db-build", b.name), b) for b in blocks}
        stage.finalize(blocks, results)  # warm-up: one-time allocations of h5py and numpy
        tracemalloc.start()
        stage.finalize(blocks, results)
        peaks[copies] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        n = read_h5(wd / "db" / "merged" / "train.hdf5")["chunks"].shape[0]
        assert n > 400 * copies  # the merged DB did grow
        rows[copies] = n
    # A merge holding the merged rows in memory would grow by their bytes (uint32 x 5 a row) at the least; the
    # streaming merge grows only by small per-block bookkeeping (12x the blocks).
    grown_rows_bytes = (rows[24] - rows[2]) * 5 * 4
    assert peaks[24] - peaks[2] < 0.25 * grown_rows_bytes, (peaks, rows)
