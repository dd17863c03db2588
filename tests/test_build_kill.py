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
import time

import numpy as np
import pytest

from helpers import BUILD_OPTIONS as OPTIONS
from helpers import STAGES, blocks_done, build_corpus, env_without_ray_address, outputs
from helpers import build_cli_args as cli_args
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

pytestmark = pytest.mark.slow  # eight killed builds and a rerun on Ray

# (stage, how): a block count watched from outside, or a failpoint inside a one-off job
KILLS = [("db-build", "blocks"), ("db-build", "db-build:finalize"), ("embed-sampled", "blocks"),
         ("index-train", "index-train:trained"), ("index-add", "blocks"), ("index-add", "index-add:finalized"),
         ("query-neighbors", "blocks"), ("query-neighbors", "query-neighbors:finalize")]


def test_sigkill_at_points_over_all_stages_then_rerun_is_byte_identical(tmp_path, gpt_tokenizer_path, tiny_bert_dir,
                                                                        corpus_texts):
    prefix = build_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts)
    ref = tmp_path / "ref"
    done = run_stages(str(ref), STAGES, {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path,
                                         "embedder": tiny_bert_dir, **OPTIONS},
                      RunOptions(executor="local", progress=False))
    totals = {s: done[s]["blocks"] for s in STAGES}
    for s in ("db-build", "embed-sampled", "index-add", "query-neighbors"):
        assert totals[s] >= 2, (s, totals)  # a kill can land between blocks

    wd = tmp_path / "w"
    env = env_without_ray_address()
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
