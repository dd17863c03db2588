"""Reading a workdir whose inputs changed since it was built: ``retro-pipeline inspect``, ``retro.init`` and
``RetroDataset`` refuse what ``retro-pipeline status`` calls stale (one error line naming the file, what changed
and the fix) unless told to allow it (``--allow-changed`` / ``allow_changed=True``), then they warn; and
``inspect`` cuts a long text before its repr, so what it shows is always a valid repr."""

from __future__ import annotations

import ast
import json
import os
import warnings

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from retro_pipeline.cli import cli
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import IndexedDataset, write_indexed_dataset
from retro_pipeline.errors import RetroError
from retro_pipeline.pipeline import run_stages, status
from retro_pipeline.tokenizers import load_gpt_tokenizer

STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir):
    """A finished workdir over 24 short documents of words; the tests change its corpus and restore it."""
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    tmp = tmp_path_factory.mktemp("read_inputs")
    words = gpt.encode_batch([" the function returns a list of values for each argument given to the class"])[0]
    rng = np.random.default_rng(3)
    docs = [np.append(rng.choice(words, int(n)), gpt.eod_id).astype(np.int64) for n in rng.choice([3, 6, 9, 13], 24)]
    prefix = str(tmp / "c")
    write_indexed_dataset(prefix, docs, np.uint16)
    wd = tmp / "w"
    given = {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path, "embedder": tiny_bert_dir,
             "chunk_length": 4, "seq_length": 16, "split": "80,10,10", "index_str": "Flat", "batch_size": 32,
             "device": "cpu", "num_neighbors_query": 10, "num_neighbors_save": 3, "num_queries": 5,
             "global_batch_size": 3, "eval_iters": 1, "eval_interval": 1000}
    run_stages(str(wd), STAGES, given, RunOptions(executor="local", progress=False))
    with h5py.File(wd / "db" / "merged" / "train.hdf5", "r") as f:
        _, doc, start = (int(x) for x in f["chunks"][0, :3])
    first = int(IndexedDataset(prefix).sequence_offsets[doc]) + start  # chunk 0's first token, in the .bin
    return {"wd": wd, "bin": prefix + ".bin", "idx": prefix + ".idx", "chunk0_byte": 2 * first}


@pytest.fixture()
def restore(built):
    """Put the corpus files and config.json back as they were built (bytes and mtimes) after the test."""
    paths = [built["bin"], built["idx"], str(built["wd"] / "config.json")]
    saved = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in paths}
    yield
    for p, (data, mtime) in saved.items():
        with open(p, "wb") as f:
            f.write(data)
        os.utime(p, ns=(mtime, mtime))
    assert not any(st.get("stale") for st in status(built["wd"]).values())


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flip_a_byte(path, at):
    """Flip the low bit of byte ``at`` of ``path`` (a uint16 token id: another token), keeping its size, and
    move its mtime on."""
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0x01
    st = os.stat(path)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def one_error(r, *words):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def changed_warnings(record):
    from retro_pipeline.read import ChangedInputWarning

    return [str(w.message) for w in record if issubclass(w.category, ChangedInputWarning)]


def test_a_db_only_workdir_refuses_a_changed_corpus_unless_allowed(tmp_path, gpt_tokenizer_path, bert_dir):
    """The quick case (db-build alone, a tokenizer-only embedder): retro.init and inspect db."""
    from retro_pipeline import retro

    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    words = gpt.encode_batch([" the function returns a list of values"])[0]
    docs = [np.append(np.roll(words, i)[:5], gpt.eod_id) for i in range(12)]
    prefix, wd = str(tmp_path / "c"), tmp_path / "w"
    write_indexed_dataset(prefix, docs, np.uint16)
    run_stages(str(wd), ["db-build"], {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                       "embedder": bert_dir, "chunk_length": 4, "seq_length": 16,
                                       "split": "80,10,10"}, RunOptions(executor="local", progress=False))
    retro.init(wd)  # clean
    n = retro.get_db_num_chunks()
    flip_a_byte(prefix + ".bin", 0)  # the first token of document 0
    one_error(invoke("inspect", "-w", wd, "db", 0), f"{prefix}.bin changed content", "--allow-changed", "--force")
    with pytest.raises(RetroError, match=f"{prefix}.bin changed content.*allow_changed=True"):
        retro.init(wd)
    with pytest.warns(Warning, match=f"{prefix}.bin changed content") as rec:
        retro.init(wd, allow_changed=True)
    assert len(changed_warnings(rec)) == 1 and retro.get_db_num_chunks() == n > 0
    r = invoke("inspect", "-w", wd, "db", 0, "--allow-changed")
    assert r.exit_code == 0 and r.stderr.startswith("warning: ") and f"{prefix}.bin changed content" in r.stderr
    assert r.stdout.startswith(f"chunk 0 of {n} (train DB)")


@pytest.mark.slow
def test_a_changed_corpus_byte_is_refused_by_every_reader_unless_allowed(built, restore):
    from retro_pipeline import retro
    from retro_pipeline.dataset import RetroDataset, RetroSamples

    wd, path = built["wd"], built["bin"]
    with warnings.catch_warnings(record=True) as rec:  # clean: no error, no warning
        warnings.simplefilter("always")
        retro.init(wd)
        before = retro.get_db_chunk_text(0), RetroSamples(wd, "train")[0]["neighbor_tokens"]
    assert not changed_warnings(rec) and before[0]
    clean = invoke("inspect", "-w", wd, "db", 0)
    assert clean.exit_code == 0 and not clean.stderr, clean.output

    size = os.path.getsize(path)
    flip_a_byte(path, built["chunk0_byte"])
    assert os.path.getsize(path) == size  # same size, later mtime: only the content hash sees it
    assert "changed content" in status(wd)["db-build"]["stale"]
    for sub in (["db", "0"], ["sample", "train", "0"]):
        one_error(invoke("inspect", "-w", wd, *sub), str(wd), "db-build is stale", f"{path} changed content",
                  "--force", "--allow-changed")
    with pytest.raises(RetroError, match=f"db-build is stale.*{path} changed content.*allow_changed=True"):
        retro.init(wd)
    with pytest.raises(RetroError, match="no workdir yet"):  # a refused init leaves nothing to read from
        retro.get_db_chunk_text(0)
    for cls in (RetroSamples, RetroDataset):
        with pytest.raises(RetroError, match=f"{path} changed content.*allow_changed=True"):
            cls(wd, "train")

    # allowed: the same line as a warning, and the changed corpus is what is read
    r = invoke("inspect", "-w", wd, "db", 0, "--allow-changed")
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and f"{path} changed content" in warned[0]
    assert r.stdout.splitlines()[1] != clean.stdout.splitlines()[1]  # chunk 0's GPT tokens: the changed ones
    r = invoke("inspect", "--allow-changed", "-w", wd, "sample", "train", 0)  # before the subcommand too
    assert r.exit_code == 0 and len([ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]) == 1, r.output
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        retro.init(wd, allow_changed=True)
        retro.get_pt_sample("train", 0)  # the neighbors are stale by the same change: not warned twice
        ds = retro.get_pt_dataset("train")
    assert len(changed_warnings(rec)) == 1 and f"{path} changed content" in changed_warnings(rec)[0]
    mine = [w for w in rec if str(w.message) == changed_warnings(rec)[0]]
    assert mine[0].filename == __file__  # attributed to the caller, not to the package's insides
    assert len(ds) == len(RetroSamples(wd, "train", allow_changed=None))
    for cls in (RetroSamples, RetroDataset):
        with pytest.warns(Warning, match=f"{path} changed content") as rec:
            item = cls(wd, "train", allow_changed=True)[0]
        assert len(changed_warnings(rec)) == 1 and item["neighbor_tokens"].shape == before[1].shape


def chunk_text_line(wd):
    r = invoke("inspect", "-w", wd, "db", 0)
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.mark.slow
def test_an_appended_byte_names_the_size_and_a_touched_file_is_no_change(built, restore):
    from retro_pipeline import retro

    wd, path = built["wd"], built["bin"]
    shown = chunk_text_line(wd)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: the hash is unchanged
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        retro.init(wd)
    assert not changed_warnings(rec) and chunk_text_line(wd) == shown
    with open(path, "ab") as f:
        f.write(b"\0")
    size = f"changed size ({st.st_size} -> {st.st_size + 1} bytes)"
    one_error(invoke("inspect", "-w", wd, "db", 0), f"{path} {size}", "--allow-changed")
    with pytest.raises(RetroError, match=rf"{path} changed size \({st.st_size} -> {st.st_size + 1} bytes\)"):
        retro.init(wd)
    os.remove(path)
    with pytest.raises(RetroError, match=f"{path} is gone"):
        retro.init(wd)


@pytest.mark.slow
def test_stale_neighbors_are_refused_where_they_are_read_and_the_db_is_not(built, restore):
    """Changed settings of query-neighbors alone: status calls it stale; the DB reads stay clean."""
    from retro_pipeline import retro
    from retro_pipeline.dataset import RetroSamples

    wd = built["wd"]
    cfg_path = wd / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fingerprints"]["query-neighbors"] = "0" * 16
    cfg_path.write_text(json.dumps(cfg))
    st = status(wd)
    assert st["query-neighbors"]["stale"] == "its settings changed" and "stale" not in st["db-build"]
    assert invoke("inspect", "-w", wd, "db", 0).exit_code == 0
    one_error(invoke("inspect", "-w", wd, "sample", "train", 0), "query-neighbors is stale", "its settings changed",
              "--allow-changed")
    retro.init(wd)
    assert retro.get_db_num_chunks() > 0
    with pytest.raises(RetroError, match="query-neighbors is stale.*allow_changed=True"):
        retro.get_pt_sample("train", 0)
    with pytest.raises(RetroError, match="query-neighbors is stale"):
        RetroSamples(wd, "train")
    r = invoke("inspect", "-w", wd, "sample", "train", 0, "--allow-changed")
    assert r.exit_code == 0 and r.stderr.startswith("warning: ") and "query-neighbors is stale" in r.stderr


@pytest.mark.slow
def test_inspect_sample_shows_whole_reprs_of_cut_texts(built):
    r = invoke("inspect", "-w", built["wd"], "sample", "train", 0, "--width", 12)
    assert r.exit_code == 0, r.output
    shown = [ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("chunk ")]
    assert len(shown) == 4 and any("…+" in t for t in shown)
    for t in shown:
        kept, sep, n = t.rpartition("…+")
        assert len(t) <= 12 and isinstance(ast.literal_eval(kept if sep else t), str) and (not sep or int(n) > 0)


def test_inspect_cuts_the_text_not_its_repr():
    from retro_pipeline.cli_inspect import _short

    texts = ["a\x01b\x02c" * 20, "it's \"q\" " * 10, "\n\t\\" * 30, "é" * 100, "x\\x41" * 40]
    for t in texts:
        for width in (10, 11, 12, 17, 40, 80):
            shown = _short(t, width)
            r, sep, n = shown.rpartition("…+")
            kept = ast.literal_eval(r)  # a complete repr: no half escape at the cut
            assert sep and t.startswith(kept) and len(kept) + int(n) == len(t), (t, width, shown)
            assert len(shown) <= width or kept == "", (width, shown)
            assert len(_short(t, width + 8)) >= len(shown)
    assert _short("short", 10) == "'short'"
    assert _short("a\x01b\x02c" * 20, 12) == "'a\\x01b'…+97"
