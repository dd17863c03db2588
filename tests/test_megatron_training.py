"""Megatron's own RETRO training path reads a workdir as it is: Megatron-LM's load_retro_args finds every key
of config.json, and megatron-core 0.13.1's get_retro_datasets (over MultiSplitGPTDataset / BlendedDataset, built
as pretrain_retro.py builds them) gives every sample our sample's text and the neighbor ids our RetroDataset
gives. The README's main command's workdir is checked the same way in test_main_command.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import STAGES, random_size_corpus
from megatron_ref import check_megatron_reads_workdir, megatron_retro_datasets
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer


@pytest.fixture(scope="module")
def blend_build(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir, corpus_texts):
    """A default build (split 98,2,0, split mode, seed, block size) of a 0.6/0.4 blend of two real-text corpora,
    with a tokenizer.json GPT tokenizer (Megatron reads it as a HuggingFaceTokenizer)."""
    tmp = tmp_path_factory.mktemp("megatron_training")
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    a = random_size_corpus(tmp / "a", gpt, corpus_texts[:60], 0, [3, 9, 20, 40, 90], 300)
    b = random_size_corpus(tmp / "b", gpt, corpus_texts[60:120], 1, [5, 30, 70], 150)
    wd = tmp / "w"
    out = run_stages(str(wd), STAGES, {
        "data_path": ["0.6", a, "0.4", b], "gpt_tokenizer": gpt_tokenizer_path, "embedder": tiny_bert_dir,
        "chunk_length": 16, "seq_length": 128, "global_batch_size": 4, "eval_iters": 3, "eval_interval": 5,
        "num_neighbors_save": 4, "index_str": "Flat", "device": "cpu"}, RunOptions(executor="local", progress=False))
    return wd, out


def test_megatron_training_reads_a_blended_workdir(blend_build):
    wd, out = blend_build
    stored = json.loads((wd / "config.json").read_text())
    assert stored["retro_gpt_tokenizer_type"] == "HuggingFaceTokenizer" and stored["retro_gpt_vocab_file"] is None
    assert stored["retro_gpt_data_path"][0::2] == ["0.6", "0.4"] and stored["retro_neighbor_dirs"]["test"] is None
    q = out["query-neighbors"]
    train = q["n_samples_train"]
    # Megatron's counts: valid (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    assert q["n_samples_valid"] == (train // 4 // 5 + 1) * 3 * 4 and "n_samples_test" not in q
    assert check_megatron_reads_workdir(wd, "98,2,0") == train + q["n_samples_valid"]


def test_megatron_finds_each_chunk_in_its_block_file(blend_build):
    """Megatron opens chunk c's neighbors in the file starting at c // retro_block_size * retro_block_size,
    row c % retro_block_size: with blocks smaller than a split, every row still lands where it was written."""
    import h5py

    wd, _ = blend_build
    stored = json.loads((wd / "config.json").read_text())
    block = stored["retro_block_size"]
    (train, valid, _), args, sizes = megatron_retro_datasets(wd, "98,2,0", stored["num_neighbors_save"])
    for ds, n, name in ((train, sizes[0], "train"), (valid, sizes[1], "valid")):
        files = sorted((wd / "query" / stored["retro_neighbor_dirs"][name]).glob("*.hdf5"))
        rows = np.concatenate([h5py.File(p, "r")["neighbors"][...] for p in files])
        assert len(files) >= 2 and len(rows) == n * 128 // 16
        for c in range(0, len(rows), 7):
            with h5py.File(ds.neighbor_path_map[c], "r") as f:
                assert np.array_equal(f["neighbors"][c % block], rows[c])


def test_a_split_other_than_the_builds_gives_other_samples_and_the_check_sees_it(blend_build):
    """The README says: pass Megatron the build's --split. With '99,1,0' Megatron intersects it with the build's
    98,2,0: the train documents are the same (so are the train samples) but valid starts later: other samples."""
    wd, _ = blend_build
    with pytest.raises(AssertionError, match="'valid'"):
        check_megatron_reads_workdir(wd, "99,1,0")


def test_no_evaluation_still_gives_megatron_every_split_directory(tmp_path, gpt_tokenizer_path, tiny_bert_dir,
                                                                   corpus_texts):
    """--eval-iters 0: Megatron asks 0 valid and 0 test samples but still opens their neighbor directories."""
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    a = random_size_corpus(tmp_path / "a", gpt, corpus_texts[:60], 2, [3, 9, 20, 40, 90], 200)
    wd = tmp_path / "w"
    out = run_stages(str(wd), STAGES, {
        "data_path": ["1", a], "gpt_tokenizer": gpt_tokenizer_path, "embedder": tiny_bert_dir, "chunk_length": 16,
        "seq_length": 64, "split": "90,5,5", "eval_iters": 0, "num_neighbors_save": 3, "index_str": "Flat",
        "device": "cpu"}, RunOptions(executor="local", progress=False))
    q = out["query-neighbors"]
    assert q["n_samples_valid"] == q["n_samples_test"] == 0 < q["n_samples_train"]
    stored = json.loads((wd / "config.json").read_text())
    for split in ("valid", "test"):
        d = wd / "query" / stored["retro_neighbor_dirs"][split]
        assert d.is_dir() and not list(d.iterdir())
    assert check_megatron_reads_workdir(wd, "90,5,5") == q["n_samples_train"]
    from click.testing import CliRunner

    from retro_pipeline.cli import cli

    r = CliRunner().invoke(cli, ["inspect", "--workdir", str(wd), "sample", "valid", "0"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {wd}: the valid split has no samples (Megatron's training asks none of it by --eval-iters, "
        f"--global-batch-size); nothing to show"], r.stderr
