"""`train-tokenizer` and `preprocess` as a user meets them: one `error:` line (exit 2, no traceback, nothing
that looks finished) for mistakes, warnings for what is skipped, a summary line that tells what was written."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import click
import pytest

from helpers import assert_clean_error, invoke
from retro_pipeline.cli import cli

TEXTS = ["Hello world", "Retrieval-enhanced transformers, café 日本", "a\nb\n\nc", "The end."]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def assert_no_corpus(prefix):
    assert not os.path.exists(f"{prefix}.idx") and not os.path.exists(f"{prefix}.bin")


@pytest.fixture()
def docs(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", TEXTS)


# -- the tokenizer hub id: fast, whole message --------------------------------------------------------
@pytest.mark.parametrize("offline", ["env", "endpoint"])
def test_preprocess_mistyped_hub_id_fails_fast(tmp_path, docs, monkeypatch, offline):
    if offline == "endpoint":  # nothing listens there: what a machine without internet sees
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    r = invoke("preprocess", "--input", docs, "--output-prefix", tmp_path / "out" / "c", "--tokenizer", "gpt-2",
               "--no-progress")
    line = assert_clean_error(r, "'gpt-2'", "cannot be reached", "'gpt2' for the packaged GPT-2 BPE")
    assert ("HF_HUB_OFFLINE" if offline == "env" else "127.0.0.1:9") in line
    assert time.monotonic() - t0 < 10
    assert_no_corpus(tmp_path / "out" / "c")


# -- option values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-2"])
def test_preprocess_workers_must_be_positive(tmp_path, docs, value):
    r = invoke("preprocess", "--input", docs, "--output-prefix", tmp_path / "c", "--tokenizer", "gpt2",
               "--workers", value, "--no-progress")
    assert_clean_error(r, "--workers", value)
    assert_no_corpus(tmp_path / "c")


def test_train_tokenizer_min_frequency_must_be_positive(tmp_path, docs):
    r = invoke("train-tokenizer", "--input", docs, "--output", tmp_path / "tok", "--vocab-size", "400",
               "--min-frequency", "0")
    assert_clean_error(r, "--min-frequency", "0 is not in the range")
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_every_option_has_help():
    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert {"preprocess", "train-tokenizer", "train", "verify", "inspect", "status"} <= set(names)
    for name in names:
        cmd = cli.get_command(ctx, name)
        subs = [cmd, *cmd.commands.values()] if isinstance(cmd, click.Group) else [cmd]
        for c in subs:
            missing = [p.name for p in c.params
                       if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()
                       and p.name != "help"]
            assert not missing, (name, c.name, missing)
        assert "Traceback" not in invoke(name, "--help").output


# -- unwritable outputs ----------------------------------------------------------------------------------
def _unwritable(tmp_path):
    (tmp_path / "afile").write_text("x")
    places = [tmp_path / "afile" / "sub" / "c"]  # a parent that is a file
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        places.append("/proc/x/corpus")
    return places


def test_preprocess_unwritable_output_prefix(tmp_path, docs):
    for prefix in _unwritable(tmp_path):
        r = invoke("preprocess", "--input", docs, "--output-prefix", prefix, "--tokenizer", "gpt2", "--no-progress")
        assert_clean_error(r, str(prefix), "cannot write")
        assert_no_corpus(prefix)


def test_preprocess_prefix_that_is_a_directory(tmp_path, docs):
    r = invoke("preprocess", "--input", docs, "--output-prefix", f"{tmp_path / 'out'}/", "--tokenizer", "gpt2",
               "--no-progress")
    assert_clean_error(r, "names a directory")
    assert not (tmp_path / "out" / ".idx").exists()


def test_train_tokenizer_unwritable_output(tmp_path, docs):
    for out in _unwritable(tmp_path):
        r = invoke("train-tokenizer", "--input", docs, "--output", out, "--vocab-size", "400")
        assert_clean_error(r, "--output", str(out), "cannot write")


# -- what is skipped is said -----------------------------------------------------------------------------
def test_preprocess_empty_records_are_counted(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ["", "x", "", "y z"])
    r = invoke("preprocess", "--input", src, "--output-prefix", tmp_path / "c", "--tokenizer", "gpt2",
               "--no-progress")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "warning: preprocess: 2 of 4 input records were empty" in r.stderr
    assert "2 documents" in r.stdout and "2 empty records skipped" in r.stdout


def test_preprocess_directory_reads_known_kinds_only(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(TEXTS[0])
    (d / "b.md").write_text(TEXTS[1])
    (d / "README").write_text(TEXTS[2])
    write_jsonl(d / "sub" / "c.jsonl", [TEXTS[3]])
    with gzip.open(d / "run.log.gz", "wb") as f:  # a compressed log: used to abort the run
        f.write(b"\x00\xff binary log")
    (d / "weights.bin").write_bytes(bytes(range(256)))
    (d / "core.dump").write_bytes(b"\xff\xfe")
    (d / ".cache").write_bytes(b"\xff")  # hidden: skipped without a word, as before
    r = invoke("preprocess", "--input", d, "--output-prefix", tmp_path / "c", "--tokenizer", "gpt2",
               "--no-progress")
    assert r.exit_code == 0, (r.output, r.exception)
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 3 files of unknown kind" in warnings[0], r.stderr
    assert "core.dump" in warnings[0] and "run.log.gz" in warnings[0] and ".cache" not in warnings[0]
    assert "4 documents" in r.stdout
    # a file named on the command line is read whatever its suffix
    (tmp_path / "notes.log").write_text("plain notes")
    r = invoke("preprocess", "--input", tmp_path / "notes.log", "--output-prefix", tmp_path / "n", "--tokenizer",
               "gpt2", "--no-progress")
    assert r.exit_code == 0 and "1 documents" in r.stdout and "warning" not in r.stderr


def test_preprocess_broken_gzip_is_one_line(tmp_path):
    (tmp_path / "docs.jsonl.gz").write_bytes(b"not gzip at all\n")
    r = invoke("preprocess", "--input", tmp_path / "docs.jsonl.gz", "--output-prefix", tmp_path / "c",
               "--tokenizer", "gpt2", "--no-progress")
    assert_clean_error(r, "docs.jsonl.gz", "gzip")
    assert_no_corpus(tmp_path / "c")


def test_preprocess_progress_bar_ends_at_its_total(tmp_path, docs):
    r = invoke("preprocess", "--input", docs, "--output-prefix", tmp_path / "c", "--tokenizer", "gpt2")
    assert r.exit_code == 0, (r.output, r.exception)
    size = docs.stat().st_size
    assert "100%" in r.stderr and f"{size}/{size}" in r.stderr, r.stderr


# -- train-tokenizer -------------------------------------------------------------------------------------
def test_train_tokenizer_says_when_the_vocabulary_is_smaller(tmp_path, docs):
    r = invoke("train-tokenizer", "--input", docs, "--output", tmp_path / "tok", "--vocab-size", "5000")
    assert r.exit_code == 0, (r.output, r.exception)
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size()
    assert size < 5000
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    assert f"{size:,} entries" in warnings[0] and "5,000" in warnings[0] and "min frequency 2" in warnings[0]
    assert f"vocabulary of {size:,} tokens (asked for 5,000)" in r.stdout


# -- module structure ------------------------------------------------------------------------------------
def test_no_import_loop_and_no_heavy_imports(tmp_path, docs):
    code = (
        "import sys\n"
        "import retro_pipeline.tokenizers as T\n"
        "import retro_pipeline.inputs, retro_pipeline.arrays, retro_pipeline.corpus, retro_pipeline.chunks\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'h5py') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        f"T.train_tokenizer([{str(docs)!r}], {str(tmp_path / 'tok')!r}, vocab_size=400)\n"
        "assert 'retro_pipeline.preprocess' not in sys.modules\n"
        "import retro_pipeline.preprocess\n"
        "assert not hasattr(T, 'default_embedder_path')\n"
        "print('ok')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
