"""query-neighbors: every saved neighbor list of Megatron's pretraining samples equals a brute-force numpy
search over the DB embeddings with the same own-sample filter; query files hold retro_block_size rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import STAGES, random_size_corpus, saved_neighbors
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import IndexedDataset
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

SEQ, CL = 64, 16


def corpus(tmp_path, gpt, texts, seed, name="c"):
    """Real text cut into documents of random sizes, many shorter than a chunk (samples span several)."""
    return random_size_corpus(tmp_path / name, gpt, texts, seed, [3, 9, 20, 40, 90], 400)


def build(wd, prefix, gpt_path, model, **kw):
    given = {"data_path": ["1", prefix], "gpt_tokenizer": gpt_path, "embedder": model, "chunk_length": CL,
             "seq_length": SEQ, "split": "80,10,10", "index_str": "Flat", "batch_size": 32, "device": "cpu",
             "global_batch_size": 4, "eval_iters": 2, "eval_interval": 1000,
             "num_neighbors_query": 100000, "num_neighbors_save": 5, "num_queries": 20, **kw}
    return run_stages(str(wd), STAGES, given, RunOptions(executor="local", progress=False))


@pytest.mark.parametrize("seed", [0, 1])
def test_neighbors_equal_a_numpy_brute_force_with_the_own_sample_filter(tmp_path, gpt_tokenizer_path, tiny_bert_dir,
                                                                       corpus_texts, seed):
    from embedder import Encoder
    from retro_pipeline.read import WorkdirReader
    from retro_pipeline.workdir import Workdir

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    prefix = corpus(tmp_path, gpt, corpus_texts[:40], seed)
    wd = tmp_path / "w"
    out = build(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, **({"block_size": 50} if seed else {}))
    assert out["query-neighbors"]["n_samples_train"] > 20
    assert out["query-neighbors"]["n_samples_valid"] == out["query-neighbors"]["n_samples_test"] == 8
    assert out["query-neighbors"]["n_dropped_own_sample"] > out["query-neighbors"]["n_chunks_train"]  # exercised
    reader = WorkdirReader(Workdir(wd))
    cfg = reader.config
    index = reader.index()
    n_db = index.ntotal
    xb = index.reconstruct_n(0, n_db)
    db = reader.db_chunks("train")
    ds = IndexedDataset(prefix)
    enc = Encoder.load(tiny_bert_dir, device="cpu")
    stored = json.loads((wd / "config.json").read_text())
    block = stored["retro_block_size"]
    for split in ("train", "valid", "test"):
        ss = reader.samples(split)
        saved = saved_neighbors(wd, split)
        assert saved.shape == (ss.n_samples * SEQ // CL, 5)
        files = sorted((wd / "query" / stored["retro_neighbor_dirs"][split]).glob("*.hdf5"))
        starts = sorted(int(p.name.split("-")[0]) for p in files)
        assert starts == list(range(0, len(saved), block))  # Megatron's c // block * block finds every chunk
        assert len(files) > (2 if seed and split == "train" else 0)  # files split samples (L = 4, 50 rows)
        tokens = ss.tokens(0, ss.n_samples)
        # embeddings of the chunks, computed here block by block as the stage batches them
        compared = 0
        for blk in sorted((wd / "markers" / "query-neighbors").glob(f"{split}__*.json")):
            m = json.loads(blk.read_text())
            a, b = (int(x) for x in m["block"].split("/")[1].split("-"))
            chunks = tokens[:, :SEQ].reshape(-1, CL)[a:b]
            q = enc.encode(gpt.decode_batch(chunks.tolist()), batch_size=32)
            d2 = ((q[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
            for c in range(len(chunks)):
                own = {tuple(x) for x in ss.doc_ids((a + c) // (SEQ // CL))}
                allowed = np.array([(int(r[0]), int(r[1])) not in own for r in db])
                ref = np.argsort(np.where(allowed, d2[c], np.inf), kind="stable")[:5]
                ref = ref[np.isfinite(d2[c][ref]) & allowed[ref]]
                got = saved[a + c]
                assert (got >= 0).sum() == len(ref) and (got[len(ref):] == -1).all()
                assert all(allowed[g] for g in got[got >= 0])  # never a document of its own sample
                np.testing.assert_allclose(d2[c][got[got >= 0]], d2[c][ref], rtol=1e-4, atol=1e-4)
                compared += 1
        assert compared == len(saved) > 0, (split, compared)
    # the workers' memory-mapped document of each train-DB row, streamed in slices: equal to the DB's columns
    from retro_pipeline.stages.query import QueryNeighborsStage

    docs_path = Workdir(wd).train_documents_path
    assert np.array_equal(np.load(docs_path), db[:, 1].astype(np.int64)) and (db[:, 0] == 0).all()
    docs_path.unlink()
    QueryNeighborsStage(Workdir(wd), cfg).write_train_documents(rows_per_read=7)
    assert np.array_equal(np.load(docs_path), db[:, 1].astype(np.int64))


def test_sample_count_errors_come_before_any_stage_runs(tmp_path, gpt_tokenizer_path, tiny_bert_dir, corpus_texts):
    from retro_pipeline.errors import RetroError

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    prefix = corpus(tmp_path, gpt, corpus_texts[:20], 3)
    n_docs = len(IndexedDataset(prefix))
    split = f"{n_docs - 1},0.1,0"  # round() leaves the valid split without a document
    with pytest.raises(RetroError, match="the valid split .* holds no documents of it, but Megatron's training asks "
                                         "8 valid samples"):
        build(tmp_path / "w", prefix, gpt_tokenizer_path, tiny_bert_dir, split=split)
    assert not (tmp_path / "w").exists()  # nothing embedded, nothing written
    with pytest.raises(RetroError, match="--seq-length 60: must be a multiple of --chunk-length 16"):
        build(tmp_path / "w2", prefix, gpt_tokenizer_path, tiny_bert_dir, seq_length=60)
