"""A user's path through the CLI: train a tokenizer, preprocess JSONL, build the DB, embed, check status."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py

from helpers import invoke_ok as invoke


def test_text_to_embeddings(tmp_path, corpus_texts, tiny_bert_dir):
    data = tmp_path / "docs.jsonl"
    with open(data, "w") as f:
        for t in corpus_texts[:40]:
            f.write(json.dumps({"text": t}) + "\n")
    invoke("train-tokenizer", "--input", str(data), "--output", str(tmp_path / "tok"), "--vocab-size", "1000")
    tok = str(tmp_path / "tok" / "tokenizer.json")
    invoke("preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "corpus"), "--tokenizer", tok,
           "--no-progress")
    wd = tmp_path / "w"
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"data_path: {tmp_path / 'corpus'}\ngpt_tokenizer: {tok}\nembedder: {tiny_bert_dir}\n"
                   f"chunk_length: 32\nexecutor: local\nbatch_size: 8\n")
    r = invoke("db-build", "--workdir", str(wd), "--config", str(cfg), "--no-progress")
    assert "db-build: done" in r.output
    r = invoke("embed-sampled", "--workdir", str(wd), "--executor", "local", "--no-progress")
    assert "embed-sampled: done" in r.output
    with h5py.File(wd / "db" / "merged" / "sampled.hdf5", "r") as f:
        n = len(f["chunks"])
    emb = [h5py.File(p, "r")["data"].shape for p in sorted((wd / "embed" / "sampled").glob("*.hdf5"))]
    assert sum(s[0] for s in emb) == n and {s[1] for s in emb} == {32}
    r = invoke("status", "--workdir", str(wd))
    assert r.output.count(" done ") == 2
    stored = json.loads((wd / "config.json").read_text())
    assert stored["chunk_length"] == 32 and stored["data_path"] == ["1.0", str(tmp_path / "corpus")]
    assert "executor" not in stored and "batch_size" not in stored  # run options are never stored


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from retro_pipeline.cli import cli\n"
            "try:\n    cli(['build', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'faiss', 'transformers', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--data-path" in out and out.strip().endswith("[]")


def test_commands_register_lazily_and_python_dash_m_runs_the_cli():
    """Command modules never import the group back (no import circle), the group finds them by name, and
    `python -m retro_pipeline` is the CLI; `--help` of the whole group still imports nothing heavy."""
    code = ("import sys\n"
            "import retro_pipeline.cli_train, retro_pipeline.cli_tools, retro_pipeline.cli_inspect, "
            "retro_pipeline.cli_verify\n"
            "print('retro_pipeline.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "retro_pipeline", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("build", "db-build", "query-neighbors", "train", "evaluate", "mine-negatives", "demo-pairs",
                 "train-tokenizer", "preprocess", "inspect", "verify", "status"):
        assert f"\n  {name} " in r.stdout, name
    r = subprocess.run([sys.executable, "-m", "retro_pipeline", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--grad-accum" in r.stdout, r.stderr
    for args in (["--help"], ["train", "--help"]):   # train --help reads every task's declared options
        code = ("import sys; from retro_pipeline.cli import cli\n"
                f"try:\n    cli({args!r})\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in ('torch', 'ray', 'faiss', 'transformers', 'h5py') if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert ("mine-negatives" if args == ["--help"] else "--mlm-probability") in out, out
        assert out.strip().endswith("[]"), out
