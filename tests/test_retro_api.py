"""Reading a finished workdir: RetroDataset items, the Megatron-style ``retro`` getters and ``retro-pipeline
inspect``, each compared with what the raw corpus arrays and the raw HDF5 files say."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest

from helpers import STAGES, assert_clean_error, invoke, saved_neighbors
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import write_indexed_dataset
from retro_pipeline.errors import RetroError
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

SEQ, CL, K = 16, 4, 100  # K > train-DB rows: every chunk's list ends in -1 padding


def given(prefix, gpt_path, model):
    return {"data_path": ["1", prefix], "gpt_tokenizer": gpt_path, "embedder": model, "chunk_length": CL,
            "seq_length": SEQ, "split": "80,10,10", "index_str": "Flat", "batch_size": 32, "device": "cpu",
            "num_neighbors_query": K, "num_neighbors_save": K, "num_queries": 5, "global_batch_size": 3,
            "eval_iters": 1, "eval_interval": 1000}


@pytest.fixture(scope="module")
def built(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir):
    """30 documents of words, 2..17 tokens long (+ EOD): many end in a chunk shorter than CL."""
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    tmp = tmp_path_factory.mktemp("retro_api")
    words = gpt.encode_batch([" the function returns a list of values for each argument given to the class method"
                              " and the module imports"])[0]
    rng = np.random.default_rng(7)
    docs = [np.append(rng.choice(words, int(n)), gpt.eod_id).astype(np.int64)
            for n in rng.choice([2, 3, 5, 6, 8, 9, 13, 17], 30)]
    prefix = str(tmp / "c")
    write_indexed_dataset(prefix, docs, np.uint16)
    wd = tmp / "w"
    run_stages(str(wd), STAGES, given(prefix, gpt_tokenizer_path, tiny_bert_dir),
               RunOptions(executor="local", progress=False))
    db = h5py.File(wd / "db" / "merged" / "train.hdf5", "r")["chunks"][...].astype(np.int64)
    return {"wd": wd, "docs": docs, "db": db, "gpt": gpt, "prefix": prefix}


def last_of_long_doc(db) -> int:
    """A train-DB row that ends its document, with an earlier row of the same document before it."""
    end = np.append((db[1:, :2] != db[:-1, :2]).any(1), True)
    after_same = np.insert((db[1:, :2] == db[:-1, :2]).all(1), 0, False)
    return int(np.flatnonzero(end & after_same)[0])


def sample_start(ss, i) -> int:
    """Stream position where sample i starts (its shuffled sample index times SEQ)."""
    return int(ss.parts[0].stream_start(ss.within[i:i + 1])[0])


def touched_docs(b, ss, i) -> np.ndarray:
    """(dataset, doc) rows of the document-index entries whose tokens intersect sample i's [p, p + SEQ],
    from the raw document lengths."""
    index = ss.parts[0].document_index
    starts = np.concatenate([[0], np.cumsum([len(b["docs"][int(d)]) for d in index])])
    p = sample_start(ss, i)
    touched = np.flatnonzero((starts[:-1] <= p + SEQ) & (starts[1:] > p))
    return np.stack([np.zeros(len(touched), np.int64), index[touched].astype(np.int64)], axis=1)


def expected_item(b, split, i, r=2):
    """Item i computed from the raw corpus, the raw neighbor files and the raw train-DB rows, with loops."""
    from retro_pipeline.read import WorkdirReader
    from retro_pipeline.workdir import Workdir

    ss = WorkdirReader(Workdir(b["wd"])).samples(split)  # its document index and shuffle; tokens are gathered here
    assert not ss.blended and len(ss.parts) == 1 and (ss.corpus == 0).all()  # one corpus: one GPTSamples
    stream = np.concatenate([b["docs"][int(doc)] for doc in ss.parts[0].document_index])
    p = sample_start(ss, i)
    db, eod, L = b["db"], b["gpt"].eod_id, SEQ // CL
    nb = saved_neighbors(b["wd"], split)[i * L:(i + 1) * L]
    chunks = np.full((L, nb.shape[1], r), -1)
    tokens = np.full((L, nb.shape[1], r * CL), eod)
    for j in range(L):
        for m, n in enumerate(nb[j]):
            for c in range(r):
                if n < 0 or n + c >= len(db) or tuple(db[n + c, :2]) != tuple(db[n, :2]):
                    break
                chunks[j, m, c] = n + c
                t = b["docs"][db[n + c, 1]][db[n + c, 2]:db[n + c, 3]]
                tokens[j, m, c * CL:c * CL + len(t)] = t
    return {"text": stream[p:p + SEQ + 1], "neighbor_chunks": chunks, "neighbor_tokens": tokens,
            "neighbor_mask": chunks >= 0}, stream, ss


def test_items_equal_the_raw_corpus_and_neighbor_files(built):
    from retro_pipeline.dataset import RetroDataset

    wd, db = built["wd"], built["db"]
    ds = RetroDataset(wd, "train")
    assert len(ds) >= 8 and len(db) < K
    seen_end = seen_cont = 0
    for i in range(len(ds)):
        got = ds[i]
        exp, stream, ss = expected_item(built, "train", i)
        assert got["text"].shape == (SEQ + 1,) and got["neighbor_chunks"].shape == (SEQ // CL, K, 2)
        assert got["neighbor_tokens"].shape == (SEQ // CL, K, 2 * CL) and got["neighbor_mask"].dtype == bool
        for key in exp:
            assert got[key].dtype == exp[key].dtype and np.array_equal(got[key], exp[key]), (i, key)
        # every train chunk outside the sample's documents is a neighbor, then -1 padding (all EOD, mask False)
        touched = touched_docs(built, ss, i)
        assert np.array_equal(ss.doc_ids(i), touched), i
        own = {tuple(t) for t in touched}
        n_other = sum(tuple(r[:2]) not in own for r in db)
        assert 0 < n_other < K and ((got["neighbor_chunks"][:, :, 0] >= 0).sum(1) == n_other).all()
        assert (got["neighbor_chunks"][:, n_other:] == -1).all() and not got["neighbor_mask"][:, n_other:].any()
        assert (got["neighbor_tokens"][:, n_other:] == built["gpt"].eod_id).all()
        last = np.append((db[1:, :2] != db[:-1, :2]).any(1), True)  # rows that end their document
        first = got["neighbor_chunks"][:, :n_other, 0]
        assert np.array_equal(got["neighbor_mask"][:, :n_other, 1], ~last[first])
        ends = got["neighbor_tokens"][:, :n_other][last[first]]
        seen_end += len(ends)
        seen_cont += int((~last[first]).sum())
        assert (ends[:, CL:] == built["gpt"].eod_id).all()  # no continuation: EOD
    assert seen_end > 0 and seen_cont > 0
    short = db[(db[:, 3] - db[:, 2]) < CL]
    assert len(short) > 0  # chunks shorter than CL were served (EOD-padded) above


def test_fewer_neighbors_more_continuations_and_eval_splits(built):
    from retro_pipeline.dataset import RetroDataset

    full = RetroDataset(built["wd"], "train")[2]
    three = RetroDataset(built["wd"], "train", num_neighbors=3, num_continuations=3)
    exp, _, _ = expected_item(built, "train", 2, r=3)
    got = three[2]
    assert got["neighbor_chunks"].shape == (SEQ // CL, 3, 3) and got["neighbor_tokens"].shape == (SEQ // CL, 3, 3 * CL)
    assert np.array_equal(got["neighbor_chunks"], exp["neighbor_chunks"][:, :3])
    assert np.array_equal(got["neighbor_tokens"], exp["neighbor_tokens"][:, :3])
    assert np.array_equal(got["neighbor_chunks"][:, :, :2], full["neighbor_chunks"][:, :3])
    for split in ("valid", "test"):
        ds = RetroDataset(built["wd"], split)
        assert len(ds) == 3
        for i in range(3):
            exp, _, _ = expected_item(built, split, i)
            assert all(np.array_equal(ds[i][k], exp[k]) for k in exp), (split, i)
    with pytest.raises(IndexError):
        three[len(three)]
    with pytest.raises(RetroError, match=f"num_neighbors {K + 1}: give 1..{K}"):
        RetroDataset(built["wd"], "train", num_neighbors=K + 1)


def test_dataloader_workers_give_the_items_of_direct_indexing(built):
    import torch
    from torch.utils.data import DataLoader

    from retro_pipeline.dataset import RetroDataset

    ds = RetroDataset(built["wd"], "train", num_neighbors=7)
    assert isinstance(ds, torch.utils.data.Dataset)
    direct = [ds[i] for i in range(len(ds))]  # opens the files in this process first; workers must reopen
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._open is None and type(clone) is type(ds)
    assert all(np.array_equal(clone[3][k], direct[3][k]) for k in direct[3])
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    # each worker opened its own files (the forked copy's handles belong to this process)
    pids = list(DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda item: (ds._pid, os.getpid())))
    assert all(a == b != os.getpid() for a, b in pids) and len({b for _, b in pids}) == 2
    for key in direct[0]:
        got = torch.cat([b[key] for b in batches]).numpy()
        assert np.array_equal(got, np.stack([d[key] for d in direct])), key


def test_retro_getters(built, tiny_bert_dir, capsys, monkeypatch):
    from tokenizers import Tokenizer

    from retro_pipeline import retro

    monkeypatch.setattr(retro, "_state", None)
    with pytest.raises(RetroError, match=r"call retro.init\('path/to/workdir'\) first"):
        retro.get_db_num_chunks()
    retro.init(built["wd"])
    db, docs, gpt = built["db"], built["docs"], built["gpt"]
    bert = Tokenizer.from_file(f"{tiny_bert_dir}/tokenizer.json")
    assert retro.get_db_num_chunks() == len(db) and retro.get_db_num_indexed_datasets() == 1
    assert retro.get_db_indexed_dataset_infos() == [(1.0, built["prefix"])]
    for i in (0, len(db) // 2, len(db) - 1):
        ds, doc, a, e, blen = db[i]
        tokens = docs[doc][a:e]
        assert retro.get_db_chunk_gpt(i) == tokens.tolist()
        text = gpt.tokenizer.decode(tokens.tolist())
        assert retro.get_db_chunk_text(i) == text
        bert_ids = bert.encode(text, add_special_tokens=False).ids
        assert retro.get_db_chunk_bert(i) == bert_ids and len(bert_ids) == blen
        assert retro.bert_to_text(bert_ids) == bert.decode(bert_ids)
        nxt = gpt.tokenizer.decode(docs[doc][db[i + 1, 2]:db[i + 1, 3]].tolist()) \
            if i + 1 < len(db) and tuple(db[i + 1, :2]) == (ds, doc) else ""
        assert retro.get_db_chunk_and_continuation_text(i) == [text, nxt]
    last = last_of_long_doc(db)
    assert retro.get_db_chunk_and_continuation_text(last)[1] == ""
    assert retro.get_db_chunk_and_continuation_text(last - 1)[1] == retro.get_db_chunk_text(last)
    with pytest.raises(RetroError, match=f"chunk id {len(db)} out of range; the train DB has {len(db)} chunks"):
        retro.get_db_chunk_text(len(db))
    # pretraining samples
    n = len(saved_neighbors(built["wd"], "train")) // (SEQ // CL)
    assert retro.get_pt_num_samples("train") == n and retro.get_pt_num_chunks("train") == n * SEQ // CL
    assert retro.get_pt_num_samples_and_chunks("valid") == (3, 3 * SEQ // CL)
    exp, stream, ss = expected_item(built, "train", 1)
    s = retro.get_pt_sample("train", 1)
    assert all(np.array_equal(s[k], exp[k]) for k in exp)
    assert s["doc_ids"].dtype == np.int64 and np.array_equal(s["doc_ids"], touched_docs(built, ss, 1))
    assert retro.gpt_to_text(s["text"]) == gpt.tokenizer.decode(s["text"].tolist(), skip_special_tokens=True)
    texts = retro.gpt_to_text(s["neighbor_tokens"])
    assert len(texts) == SEQ // CL and len(texts[0]) == K and texts[0][-1] == ""
    assert texts[1][0] == gpt.tokenizer.decode(s["neighbor_tokens"][1, 0].tolist(), skip_special_tokens=True)
    p1 = sample_start(ss, 1)
    nt = retro.get_neighbor_tokens(1, 2, "train")
    assert np.array_equal(nt["chunk_tokens"], stream[p1 + 2 * CL:p1 + 3 * CL])
    retro.print_neighbor_texts(1, 2, "train")
    out = capsys.readouterr().out.splitlines()
    chunk_text = gpt.tokenizer.decode(stream[p1 + 2 * CL:p1 + 3 * CL].tolist(), skip_special_tokens=True)
    assert out[1] == "PRETRAINING CHUNK:" and out[2] == "  - " + chunk_text and out[3] == "NEIGHBOR_CHUNKS:"
    n20 = s["neighbor_chunks"][2, 0]  # short texts: printed whole
    t20 = gpt.tokenizer.decode(np.concatenate([docs[db[c, 1]][db[c, 2]:db[c, 3]] for c in n20 if c >= 0]).tolist())
    assert out[4] == "  - " + t20 and out[-1] == "  - <none>" and len(out) == 4 + K
    assert retro.shorten("ab\ncd", 9) == "ab\\ncd" and retro.shorten("abcdefghij", 6) == "abc ... hij"
    for call, match in [(lambda: retro.get_pt_sample("train", n), f"sample {n} out of range; the train split has {n}"),
                        (lambda: retro.get_pt_sample("dev", 0), "unknown split 'dev'; use one of train, valid, test"),
                        (lambda: retro.get_pt_num_samples("dev"), "unknown split 'dev'"),
                        (lambda: retro.get_neighbor_tokens(0, SEQ // CL), "chunk 4 out of range")]:
        with pytest.raises(RetroError, match=match):
            call()


def test_inspect_cli(built):
    wd, db, docs, gpt = built["wd"], built["db"], built["docs"], built["gpt"]
    i = len(db) // 3
    r = invoke("inspect", "--workdir", wd, "db", i)
    assert r.exit_code == 0, r.output
    ds, doc, a, e, blen = (int(x) for x in db[i])
    lines = r.stdout.splitlines()
    assert lines[0] == (f"chunk {i} of {len(db)} (train DB): dataset {ds} ({built['prefix']}), doc {doc}, "
                        f"tokens {a}:{e}, bert_len {blen}")
    assert lines[1] == f"gpt tokens: {docs[doc][a:e].tolist()}"
    assert lines[2] == f"text: {gpt.tokenizer.decode(docs[doc][a:e].tolist())!r}"
    last = last_of_long_doc(db)
    assert invoke("inspect", "-w", wd, "db", last).stdout.splitlines()[-1] == \
        "continuation: none (the last chunk of its document)"
    assert invoke("inspect", "-w", wd, "db", last - 1).stdout.splitlines()[-1].startswith(f"continuation: chunk {last}")
    # a sample: its documents, each chunk, each neighbor with its continuation
    exp, stream, ss = expected_item(built, "train", 0)
    r = invoke("inspect", "--workdir", wd, "sample", "train", 0, "-k", 0, "--width", 1000)
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    p0 = sample_start(ss, 0)
    assert out[1] == "documents (dataset/doc): " + " ".join(f"{x}/{y}" for x, y in touched_docs(built, ss, 0))
    assert out[2] == f"chunk 0: {gpt.tokenizer.decode(stream[p0:p0 + CL].tolist(), skip_special_tokens=True)!r}"
    assert sum(ln.startswith("chunk ") for ln in out) == SEQ // CL and len(out) == 2 + (SEQ // CL) * (K + 1)
    n0 = int(exp["neighbor_chunks"][0, 0, 0])
    t0 = gpt.tokenizer.decode(docs[db[n0, 1]][db[n0, 2]:db[n0, 3]].tolist())
    assert out[3].startswith(f"  1. #{n0} {db[n0, 0]}/{db[n0, 1]}: {t0!r}")
    assert out[3].endswith("(end of document)") == (exp["neighbor_chunks"][0, 0, 1] < 0)
    assert out[-1] == f"  {K}. (none)" and any(ln.endswith("(end of document)") for ln in out)
    assert any(" → " in ln for ln in out)
    compact = invoke("inspect", "-w", wd, "sample", "valid", 2).stdout.splitlines()
    assert len(compact) == 2 + (SEQ // CL) * 3 and compact[0].startswith("valid sample 2 of 3: 17 tokens, 4 chunks")
    # mistakes: one line, exit 2
    assert_clean_error(invoke("inspect", "-w", wd, "db", len(db)), f"chunk id {len(db)} out of range", str(wd))
    assert_clean_error(invoke("inspect", "-w", wd, "sample", "dev", 0), "unknown split 'dev'")
    assert_clean_error(invoke("inspect", "-w", wd, "sample", "valid", 3), "sample 3 out of range; the valid split has 3")
    assert_clean_error(invoke("inspect", "db", 0), "Missing option '--workdir'")
    assert_clean_error(invoke("inspect", "-w", wd / "nothing", "db", 0), "not a retro-pipeline workdir")
    r = invoke("inspect", "--help")
    assert r.exit_code == 0 and "inspect --workdir W sample train 0" in r.output and "RetroDataset" in r.output


def test_a_workdir_without_neighbors_is_a_clear_error(built, tmp_path, gpt_tokenizer_path, tiny_bert_dir):
    from retro_pipeline.dataset import RetroSamples

    wd = tmp_path / "w"
    run_stages(str(wd), ["db-build"], given(built["prefix"], gpt_tokenizer_path, tiny_bert_dir),
               RunOptions(executor="local", progress=False))
    with pytest.raises(RetroError, match="no neighbors yet .*run 'retro-pipeline query-neighbors --workdir"):
        RetroSamples(wd, "train")
    with pytest.raises(RetroError, match="unknown split 'dev'"):
        RetroSamples(wd, "dev")
    assert_clean_error(invoke("inspect", "-w", wd, "sample", "train", 0), "no neighbors yet", "query-neighbors", str(wd))
    r = invoke("inspect", "-w", wd, "db", 0)
    assert r.exit_code == 0 and r.stdout.startswith("chunk 0 of ")


def test_rows_read_contiguous_and_chunked_hdf5_alike_and_torch_stays_unimported(tmp_path):
    import subprocess
    import sys

    from retro_pipeline.dataset import _rows

    data = np.arange(60, dtype=np.uint32).reshape(12, 5)
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        f.create_dataset("plain", data=data)
        f.create_dataset("chunked", data=data, chunks=(4, 5), compression="gzip")
    plain, chunked = _rows(tmp_path / "a.hdf5", "plain"), _rows(tmp_path / "a.hdf5", "chunked")
    assert isinstance(plain, np.memmap) and isinstance(chunked, h5py.Dataset)
    want = np.array([0, 3, 4, 11])
    assert np.array_equal(plain[want], data[want]) and np.array_equal(chunked[want], data[want])
    code = ("import sys, retro_pipeline, retro_pipeline.dataset, retro_pipeline.retro, retro_pipeline.cli; "
            "assert 'torch' not in sys.modules and 'h5py' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
