"""Bad input through the CLI: one line naming the problem, exit code 2, no traceback, nothing that looks done."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import assert_clean_error, db_build_args, invoke
from retro_pipeline.cli import cli
from retro_pipeline.corpus import write_indexed_dataset


def run(workdir, prefix, gpt, bert, *extra):
    return invoke(*db_build_args(workdir, prefix, gpt, bert, *extra))


def assert_nothing_done(workdir):
    """No merged DB file and no done marker: nothing in ``workdir`` looks like a finished db-build."""
    merged = workdir / "db" / "merged"
    assert not any(merged.glob("*.hdf5")) if merged.exists() else True
    assert not (workdir / "markers" / "db-build" / "_done.json").exists()


def corrupt(prefix, what):
    idx, binf = prefix + ".idx", prefix + ".bin"
    data = bytearray(open(idx, "rb").read())
    if what == "truncated-bin":
        b = open(binf, "rb").read()
        open(binf, "wb").write(b[:-10])
        return binf
    if what == "magic":
        data[:9] = b"NOTANIDX\x00"
    elif what == "legacy":
        data[:8] = b"TNTIDX\x00\x00"
    elif what == "version":
        data[9:17] = struct.pack("<Q", 2)
    elif what == "pointer":
        n = struct.unpack("<Q", data[18:26])[0]
        p = 34 + 4 * n + 8  # the second sequence pointer
        data[p:p + 8] = struct.pack("<q", struct.unpack("<q", data[p:p + 8])[0] + 2)
    open(idx, "wb").write(bytes(data))
    return idx


@pytest.mark.parametrize("what,word", [("truncated-bin", ".bin"), ("magic", ".idx"), ("legacy", ".idx"),
                                       ("version", ".idx"), ("pointer", ".idx")])
def test_corrupt_corpus(tmp_path, corpus, gpt_tokenizer_path, bert_dir, what, word):
    corrupt(corpus, what)
    wd = tmp_path / "w"
    r = run(wd, corpus, gpt_tokenizer_path, bert_dir)
    assert_clean_error(r, corpus + word)
    assert_nothing_done(wd)
    assert not (wd / "config.json").exists()  # a fixed corpus can be given on the next run


def test_token_outside_vocabulary(tmp_path, gpt_tokenizer_path, bert_dir):
    prefix = str(tmp_path / "big")
    write_indexed_dataset(prefix, [np.array([5, 6, 7]), np.array([8, 60000, 0])], np.uint16)
    wd = tmp_path / "w"
    r = run(wd, prefix, gpt_tokenizer_path, bert_dir)
    assert_clean_error(r, "60000", "vocabulary", prefix + ".bin")
    assert_nothing_done(wd)


def test_token_outside_vocabulary_from_a_ray_worker(tmp_path, gpt_tokenizer_path, bert_dir, ray_session):
    from retro_pipeline.config import RunOptions
    from retro_pipeline.errors import RetroError
    from retro_pipeline.pipeline import run_stages

    prefix = str(tmp_path / "big")
    write_indexed_dataset(prefix, [np.array([5, 6, 7])] * 8 + [np.array([8, 60000, 0])], np.uint16)
    with pytest.raises(RetroError, match="60000"):
        run_stages(str(tmp_path / "w"), ["db-build"], {"data_path": ["1", prefix], "gpt_tokenizer":
                   gpt_tokenizer_path, "embedder": bert_dir, "block_size": 2}, RunOptions(progress=False))
    assert not (tmp_path / "w" / "db" / "merged").exists()


def test_missing_tokenizer(tmp_path, corpus, bert_dir):
    r = run(tmp_path / "w", corpus, str(tmp_path / "nope" / "tokenizer.json"), bert_dir)
    assert_clean_error(r, "nope")
    assert_nothing_done(tmp_path / "w")


def test_empty_corpus(tmp_path, gpt_tokenizer_path, bert_dir):
    prefix = str(tmp_path / "empty")
    write_indexed_dataset(prefix, [], np.uint16)
    r = run(tmp_path / "w", prefix, gpt_tokenizer_path, bert_dir)
    assert_clean_error(r, prefix, "no documents")
    assert_nothing_done(tmp_path / "w")


def test_missing_corpus_files(tmp_path, gpt_tokenizer_path, bert_dir):
    r = run(tmp_path / "w", str(tmp_path / "absent"), gpt_tokenizer_path, bert_dir)
    assert_clean_error(r, "absent")


def test_conflicting_rerun_names_keys_and_force_rebuilds(tmp_path, corpus, gpt_tokenizer_path, bert_dir):
    wd = tmp_path / "w"
    assert run(wd, corpus, gpt_tokenizer_path, bert_dir).exit_code == 0
    n16 = json.loads((wd / "db" / "indexed_dataset_infos.json").read_text())[0]["n_chunks"]
    r = run(wd, corpus, gpt_tokenizer_path, bert_dir, "--chunk-length", "32", "--seed", "9")
    assert_clean_error(r, "chunk_length", "seed", "--force")
    assert json.loads((wd / "config.json").read_text())["chunk_length"] == 16
    # a rerun that repeats the stored values, or leaves them out, is fine
    r = CliRunner().invoke(cli, ["db-build", "--workdir", str(wd), "--executor", "local", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = run(wd, corpus, gpt_tokenizer_path, bert_dir, "--chunk-length", "32", "--force")
    assert r.exit_code == 0, r.output
    n32 = json.loads((wd / "db" / "indexed_dataset_infos.json").read_text())[0]["n_chunks"]
    assert n32 < n16
    assert json.loads((wd / "config.json").read_text())["chunk_length"] == 32


def test_status_and_bad_options(tmp_path, corpus, gpt_tokenizer_path, bert_dir):
    wd = tmp_path / "w"
    r = CliRunner().invoke(cli, ["status", "--workdir", str(wd)])
    assert_clean_error(r, "not a retro-pipeline workdir")
    assert run(wd, corpus, gpt_tokenizer_path, bert_dir).exit_code == 0
    r = CliRunner().invoke(cli, ["status", "--workdir", str(wd)])
    assert r.exit_code == 0 and "db-build" in r.output and "done" in r.output
    assert "embed-sampled" in r.output and "not started" in r.output
    assert_clean_error(run(tmp_path / "x", corpus, gpt_tokenizer_path, bert_dir, "--split", "a,b"), "--split")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunk_lenght: 3\n")
    assert_clean_error(run(tmp_path / "y", corpus, gpt_tokenizer_path, bert_dir, "--config", str(cfg)), "chunk_lenght")


def test_out_of_range_options_are_refused_from_the_command_line_and_a_config_file(tmp_path):
    """--target-recall is a recall: (0, 1]. Click refuses it on the command line, the option's check in a file."""
    from retro_pipeline.errors import RetroError
    from retro_pipeline.stage import all_options

    r = CliRunner().invoke(cli, ["index-add", "--workdir", str(tmp_path / "w"), "--target-recall", "5"])
    assert r.exit_code == 2 and "--target-recall" in r.output and "5" in r.output and "1" in r.output
    assert not (tmp_path / "w").exists()
    option = next(o for o in all_options() if o.name == "target_recall")
    assert option.check(1) == 1.0 and option.check("0.5") == 0.5
    for bad, why in ((5, "must be at most 1"), (0, "must be above 0")):
        with pytest.raises(RetroError, match=f"--target-recall {bad}.*: {why}"):
            option.check(bad)
