"""query-neighbors: pretraining samples cut as GPT pretraining does, and every saved neighbor list equals a
brute-force numpy search over the DB embeddings with the same own-sample filter."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from dbutil import random_size_corpus
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import IndexedDataset
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

pytest.importorskip("faiss")
STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]
SEQ, CL = 64, 16


def corpus(tmp_path, gpt, texts, seed, name="c"):
    """Real text cut into documents of random sizes, many shorter than a chunk (samples span several)."""
    return random_size_corpus(tmp_path / name, gpt, texts, seed, [3, 9, 20, 40, 90], 400)


def build(wd, prefix, gpt_path, model, **kw):
    given = {"data_path": ["1", prefix], "gpt_tokenizer": gpt_path, "embedder": model, "chunk_length": CL,
             "seq_length": SEQ, "split": "80,10,10", "index_str": "Flat", "batch_size": 32, "device": "cpu",
             "num_neighbors_query": 100000, "num_neighbors_save": 5, "num_queries": 20, **kw}
    return run_stages(str(wd), STAGES, given, RunOptions(executor="local", progress=False))


def neighbors(wd, split):
    d = wd / "query" / json.loads((wd / "config.json").read_text())["retro_neighbor_dirs"][split]
    files = sorted(d.glob("*.hdf5"), key=lambda p: int(p.name.split("-")[0]))
    return np.concatenate([h5py.File(p, "r")["neighbors"][...] for p in files])


@pytest.mark.parametrize("seed", [0, 1])
def test_neighbors_equal_a_numpy_brute_force_with_the_own_sample_filter(tmp_path, gpt_tokenizer_path, tiny_bert_dir,
                                                                       corpus_texts, seed):
    from embedder import Encoder
    from retro_pipeline.read import WorkdirReader
    from retro_pipeline.samples import SampleSet
    from retro_pipeline.workdir import Workdir

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    prefix = corpus(tmp_path, gpt, corpus_texts[:40], seed)
    wd = tmp_path / "w"
    out = build(wd, prefix, gpt_tokenizer_path, tiny_bert_dir)
    assert out["query-neighbors"]["n_samples_train"] > 20 and out["query-neighbors"]["n_samples_valid"] > 0
    assert out["query-neighbors"]["n_dropped_own_sample"] > out["query-neighbors"]["n_chunks_train"]  # exercised
    reader = WorkdirReader(Workdir(wd))
    cfg = reader.config
    index = reader.index()
    n_db = index.ntotal
    xb = index.reconstruct_n(0, n_db)
    db = reader.db_chunks("train")
    ds = IndexedDataset(prefix)
    enc = Encoder.load(tiny_bert_dir, device="cpu")
    train_docs = {tuple(x) for x in h5py.File(wd / "db" / "merged" / "train.hdf5", "r")["doc_offsets"][:, :2]}
    for split in ("train", "valid", "test"):
        ss = SampleSet(Workdir(wd), cfg, split, None)
        saved = neighbors(wd, split)
        assert saved.shape == (ss.n_samples * SEQ // CL, 5)
        # the stream is the split's documents in some order, EOD included; samples are windows of SEQ + 1
        first_epoch = {tuple(x) for x in ss.docs[:len(ss.split_docs)]}
        assert first_epoch == {tuple(x) for x in ss.split_docs}
        assert (first_epoch <= train_docs) == (split == "train") and not (split != "train" and first_epoch & train_docs)
        stream = np.concatenate([ds.get(int(doc)) for _, doc in ss.docs]).astype(np.int64)
        tokens = ss.tokens(0, ss.n_samples)
        for i in range(ss.n_samples):
            assert np.array_equal(tokens[i], stream[i * SEQ:i * SEQ + SEQ + 1])
        # embeddings of the chunks, computed here block by block as the stage batches them
        starts = np.concatenate([[0], np.cumsum([ds.sequence_lengths[int(d)] for _, d in ss.docs])])
        compared = 0
        for blk in sorted((wd / "markers" / "query-neighbors").glob(f"{split}__*.json")):
            m = json.loads(blk.read_text())
            a, b = (int(x) // (SEQ // CL) for x in m["block"].split("/")[1].split("-"))
            chunks = tokens[a:b, :SEQ].reshape(-1, CL)
            q = enc.encode(gpt.decode_batch(chunks.tolist()), batch_size=32)
            d2 = ((q[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
            for c in range(len(chunks)):
                i = a + c // (SEQ // CL)
                touched = np.flatnonzero((starts[:-1] <= i * SEQ + SEQ) & (starts[1:] > i * SEQ))
                own = {tuple(ss.docs[t]) for t in touched}
                allowed = np.array([(int(r[0]), int(r[1])) not in own for r in db])
                ref = np.argsort(np.where(allowed, d2[c], np.inf), kind="stable")[:5]
                ref = ref[np.isfinite(d2[c][ref]) & allowed[ref]]
                got = saved[a * SEQ // CL + c]
                assert (got >= 0).sum() == len(ref) and (got[len(ref):] == -1).all()
                assert all(allowed[g] for g in got[got >= 0])  # never a document of its own sample
                np.testing.assert_allclose(d2[c][got[got >= 0]], d2[c][ref], rtol=1e-4, atol=1e-4)
                compared += 1
        assert compared == len(saved) > 0, (split, compared)


def test_a_split_without_documents_is_an_error_when_samples_are_asked(tmp_path, gpt_tokenizer_path, tiny_bert_dir,
                                                                      corpus_texts):
    from retro_pipeline.errors import RetroError

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    prefix = corpus(tmp_path, gpt, corpus_texts[:20], 3)
    with pytest.raises(RetroError, match="the test split has no documents"):
        build(tmp_path / "w", prefix, gpt_tokenizer_path, tiny_bert_dir, split="90,10,0", eval_samples=5)
    with pytest.raises(RetroError, match="--seq-length 60: must be a multiple of --chunk-length 16"):
        build(tmp_path / "w2", prefix, gpt_tokenizer_path, tiny_bert_dir, seq_length=60)
