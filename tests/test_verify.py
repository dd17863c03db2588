"""`retro-pipeline verify`: recomputing every block of a five-stage build gives identical bytes; one flipped byte
in one block file is named, alone (exit 1); bad input is one error line (exit 2); the scratch directory never
stays behind (also on Ctrl-C) and nothing else in the workdir is written."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import STAGES, assert_clean_error
from retro_pipeline.cli import cli
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import write_indexed_dataset
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer
from retro_pipeline.verify import pick, verify


@pytest.fixture(scope="module")
def built(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir, corpus_texts):
    """A finished build of 400 short documents: 13, 4, 1, 4 and 5 blocks; kept embeddings on; pools of up to
    2048 chunks (index-add's blocks are one pool)."""
    tmp = tmp_path_factory.mktemp("verify")
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    stream, rng = np.concatenate(gpt.encode_batch(corpus_texts[:40])), np.random.default_rng(0)
    cuts = np.cumsum(rng.choice([3, 9, 20, 40, 90], size=400))
    docs = [np.append(d, gpt.eod_id) for d in np.split(stream, cuts[cuts < len(stream)])[:400]]
    write_indexed_dataset(str(tmp / "c"), docs, np.uint16)
    given = {"data_path": ["1", str(tmp / "c")], "gpt_tokenizer": gpt_tokenizer_path, "embedder": tiny_bert_dir,
             "chunk_length": 16, "seq_length": 64, "split": "80,10,10", "index_str": "Flat", "batch_size": 32,
             "embed_pool": 2048, "device": "cpu", "num_neighbors_save": 5, "num_queries": 20, "keep_embeddings": True,
             "global_batch_size": 4, "eval_iters": 4}
    run_stages(str(tmp / "w"), STAGES, given, RunOptions(executor="local", progress=False))
    return tmp / "w"


def invoke(*args):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


def files(wd):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in wd.rglob("*") if p.is_file()}


def n_blocks(wd, stage):
    return len(json.loads((wd / "markers" / stage / "_plan.json").read_text())["blocks"])


def group_size(wd, stage):
    """Blocks in the (first) group the stage's markers record; 1 where blocks were processed alone."""
    markers = [json.loads(p.read_text()) for p in sorted((wd / "markers" / stage).glob("[!_]*.json"))]
    first = markers[0].get("group")
    return sum(m.get("group") == first for m in markers) if first else 1


def test_every_block_recomputes_identically_and_one_flipped_byte_is_named_alone(built):
    before = files(built)
    # built with --batch-size 32: verify embeds as its markers record (no cap gives other float bits)
    r = invoke("--workdir", built, "--fraction", 1, "--no-progress")
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.splitlines() == [f"{s}: {n_blocks(built, s)} of {n_blocks(built, s)} blocks recomputed, all "
                                     f"identical" for s in STAGES]
    assert [n_blocks(built, s) for s in STAGES] == [13, 4, 1, 4, 5]
    assert files(built) == before  # nothing written, the scratch directory gone

    victim = sorted((built / "query").rglob("*.hdf5"))[1]
    original = victim.read_bytes()
    with h5py.File(victim, "r") as f:
        at = f["neighbors"].id.get_offset() + 8 * 7  # a byte of the 8th neighbor id: data, not metadata
    try:
        victim.write_bytes(original[:at] + bytes([original[at] ^ 1]) + original[at + 1:])
        with h5py.File(victim, "r") as f:
            assert f["neighbors"].shape[1] == 5  # still opens
        r = invoke("--workdir", built, "--fraction", 1, "--batch-size", 32, "--no-progress")
        assert r.exit_code == 1, (r.output, r.exception)
        assert [ln for ln in r.stdout.splitlines() if "DIFFERS" in ln] == [f"  DIFFERS: {victim}"]
        assert "query-neighbors: 5 of 5 blocks recomputed, 1 file differs" in r.stdout
        assert r.stdout.count("all identical") == 4
        assert not list(built.glob(".verify-*"))
    finally:
        victim.write_bytes(original)


def test_a_seeded_share_of_at_least_one_block_and_no_scratch_left_on_ctrl_c(built, monkeypatch):
    assert pick(40, 0.05, 0, "db-build") == pick(40, 0.05, 0, "db-build") != pick(40, 0.05, 1, "db-build")
    assert len(pick(40, 0.05, 0, "db-build")) == 2 and pick(0, 0.5, 0, "x") == [] and pick(40, 1, 3, "x") == \
        list(range(40))
    r = invoke("--workdir", built, "--fraction", 0.001, "--seed", 7, "--batch-size", 32, "--no-progress")
    assert r.exit_code == 0, (r.output, r.exception)
    # one block picked per stage; the embedding stages recompute its whole pool (the blocks embedded together)
    assert [ln.split(" blocks")[0] for ln in r.stdout.splitlines()] == \
        [f"{s}: {group_size(built, s)} of {n_blocks(built, s)}" for s in STAGES]
    assert group_size(built, "db-build") == 1 and group_size(built, "index-add") == n_blocks(built, "index-add") > 1

    from retro_pipeline.stages.index_add import IndexAddStage

    def interrupted(self, blocks, state, todo=None):
        assert list(built.glob(".verify-*"))  # the scratch directory exists while blocks are recomputed
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexAddStage, "process_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify(built, fraction=0.5, given={"batch_size": 32})
    assert not list(built.glob(".verify-*"))


@pytest.mark.parametrize("workdir, args, words", [
    ("empty", ["--fraction", "0"], ["--fraction 0:", "above 0 and at most 1"]),
    ("empty", ["--fraction", "1.5"], ["--fraction 1.5:"]),
    ("empty", ["--fraction", "nan"], ["--fraction nan:"]),
    ("missing", [], ["no such workdir"]),
    ("empty", [], ["not a retro-pipeline workdir"]),
    ("nothing done", [], ["no stage is done yet"]),
])
def test_bad_input_is_one_error_line(tmp_path, workdir, args, words):
    wd = tmp_path / "w"
    if workdir != "missing":
        wd.mkdir()
    if workdir == "nothing done":
        (wd / "config.json").write_text("{}")
    assert_clean_error(invoke("--workdir", wd, *args), *words)
    assert not list(tmp_path.rglob(".verify-*"))


def test_embeddings_are_recomputed_with_the_threads_the_build_used(built, monkeypatch):
    """CPU float sums depend on the thread count for some batches (measured), so block markers record the
    workers' torch threads and verify embeds with that many (a Ray build's 1-thread workers vs every CPU here
    gave a false 'DIFFERS' on the demo build)."""
    import torch

    import retro_pipeline.stages.embed as embed

    markers = sorted((built / "markers" / "embed-sampled").glob("[!_]*.json"))
    assert {json.loads(p.read_text())["run"]["threads"] for p in markers} == {torch.get_num_threads()}
    seen = []
    real = embed.embedding_state
    monkeypatch.setattr(embed, "embedding_state", lambda cfg, res: seen.append(res["num_cpus"]) or real(cfg, res))
    saved = {p: p.read_text() for p in markers}
    threads = torch.get_num_threads()
    try:
        for p in markers:   # as a build on 1-CPU Ray workers records them
            m = json.loads(saved[p])
            m["run"]["threads"] = 1
            p.write_text(json.dumps(m))
        r = invoke("--workdir", built, "--fraction", 0.2, "--no-progress")
        assert r.exit_code == 0, (r.output, r.exception)
    finally:
        for p, text in saved.items():
            p.write_text(text)
        torch.set_num_threads(threads)   # verify set this process's threads to the markers'
    assert seen and seen[0] == 1, seen           # embed-sampled: its markers' threads
