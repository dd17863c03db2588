"""SIGKILL a real `retro-pipeline build` at points spread over all five stages, rerunning after each kill;
the finished workdir is byte-identical to an uninterrupted build's.

Kills inside a stage's blocks land at a seeded random block count (the run is watched through its block
markers); kills inside the one-off jobs (the DB merge, index training, the index merge, which take
milliseconds here) land through the failpoints of ``retro_pipeline.io.failpoint``. Every kill is checked
to have killed the run (exit by SIGKILL), and the last rerun uses another worker count (two Ray workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dbutil import random_size_corpus
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

pytest.importorskip("faiss")

STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]
OPTIONS = {"chunk_length": 16, "seq_length": 64, "split": "80,10,10", "index_str": "IVF4,Flat",
           "block_size": 256, "num_queries": 40, "num_neighbors_save": 4, "num_neighbors_query": 40,
           "batch_size": 64, "device": "cpu"}
# (stage, how): a block count watched from outside, or a failpoint inside a one-off job
KILLS = [("db-build", "blocks"), ("db-build", "db-build:finalize"), ("embed-sampled", "blocks"),
         ("index-train", "index-train:trained"), ("index-add", "blocks"), ("index-add", "index-add:finalized"),
         ("query-neighbors", "blocks"), ("query-neighbors", "query-neighbors:finalize")]


def make_corpus(path, gpt, texts) -> str:
    return random_size_corpus(path, gpt, texts, 7, [5, 20, 40, 90, 150], 500)


def cli_args(wd, prefix, gpt, bert, workers):
    args = [sys.executable, "-m", "retro_pipeline.cli", "build", "--workdir", str(wd), "--data-path", prefix,
            "--gpt-tokenizer", gpt, "--embedder", bert, "--no-progress"]
    for k, v in OPTIONS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + (["--executor", "local"] if workers == 0 else ["--num-workers", str(workers)])


def outputs(wd) -> dict[str, bytes]:
    """Every output file: DBs, embeddings, index files, neighbors (markers, logs and timings aside)."""
    out = {}
    for p in sorted(wd.rglob("*")):
        rel = str(p.relative_to(wd))
        if not p.is_file() or rel.startswith(("markers", "logs")) or p.name in ("config.json", "search.json"):
            continue
        out[rel] = p.read_bytes()
    search = sorted(wd.rglob("search.json"))
    for p in search:  # the tuned setting and recalls must agree; queries/s are timings
        s = json.loads(p.read_text())
        out[str(p.relative_to(wd))] = json.dumps(
            {"params": s["params"], "recall": [{k: v for k, v in r.items() if "second" not in k}
                                                for r in s["table"]]}, sort_keys=True).encode()
    return out


def blocks_done(wd, stage) -> int:
    d = wd / "markers" / stage
    return len([p for p in d.glob("*.json") if not p.name.startswith("_")]) if d.exists() else 0


def test_sigkill_at_points_over_all_stages_then_rerun_is_byte_identical(tmp_path, gpt_tokenizer_path, tiny_bert_dir,
                                                                        corpus_texts):
    prefix = make_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts)
    ref = tmp_path / "ref"
    done = run_stages(str(ref), STAGES, {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                         "embedder": tiny_bert_dir, **OPTIONS},
                      RunOptions(executor="local", progress=False))
    totals = {s: done[s]["blocks"] for s in STAGES}
    for s in ("db-build", "embed-sampled", "index-add", "query-neighbors"):
        assert totals[s] >= 2, (s, totals)  # a kill can land between blocks

    wd = tmp_path / "w"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    rng = np.random.default_rng(11)
    landed = []
    for stage, how in KILLS:
        run_env = dict(env, RETRO_PIPELINE_KILL_AT=how) if ":" in how else env
        proc = subprocess.Popen(cli_args(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, 0), env=run_env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if how == "blocks":
            at = int(rng.integers(1, totals[stage]))  # after 1 .. total-1 finished blocks
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline and blocks_done(wd, stage) < at:
                time.sleep(0.005)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        assert proc.returncode == -signal.SIGKILL, (stage, how, proc.stderr.read().decode()[-3000:])
        assert not (wd / "markers" / stage / "_done.json").exists(), (stage, how)  # killed inside that stage
        landed.append((stage, how, blocks_done(wd, stage)))
    assert {s for s, _, _ in landed} == set(STAGES)

    r = subprocess.run(cli_args(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, 2), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    mine, theirs = outputs(wd), outputs(ref)
    assert sorted(mine) == sorted(theirs)
    assert any(k.startswith("query/") for k in mine) and any(k.startswith("index/") for k in mine)
    for k in theirs:
        assert mine[k] == theirs[k], k
    # no finished block was recomputed: over all runs, each stage ran each of its blocks about once
    for s in STAGES:
        assert json.loads((wd / "markers" / s / "_done.json").read_text())["blocks_run"] < totals[s] or s == "index-train"
