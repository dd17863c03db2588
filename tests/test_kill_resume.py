"""SIGKILL a real `retro-pipeline db-build` part-way, run it again (also with another worker count):
the merged files are byte-identical to an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import edge_case_docs, env_without_ray_address
from retro_pipeline.config import RunOptions
from retro_pipeline.corpus import write_indexed_dataset
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

pytestmark = pytest.mark.slow  # real processes killed and rerun, on Ray


def cli(workdir, prefix, gpt, bert, workers):
    return [sys.executable, "-m", "retro_pipeline.cli", "db-build", "--workdir", str(workdir), "--data-path", prefix,
            "--gpt-tokenizer", gpt, "--embedder", bert, "--chunk-length", "16", "--block-size", "10",
            "--num-workers", str(workers), "--no-progress"]


@pytest.mark.parametrize("rerun_workers", [2, 1])
def test_sigkill_then_rerun_is_byte_identical(tmp_path, gpt_tokenizer_path, bert_dir, corpus_texts, rerun_workers):
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    docs = edge_case_docs(gpt, corpus_texts[:60], 16, n_docs=400, seed=3)
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(prefix, docs, np.uint16)
    given = {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path, "embedder": bert_dir,
             "chunk_length": 16, "block_size": 10}
    run_stages(str(tmp_path / "ref"), ["db-build"], given, RunOptions(executor="local", progress=False))

    wd = tmp_path / "w"
    markers = wd / "markers" / "db-build"
    proc = subprocess.Popen(cli(wd, prefix, gpt_tokenizer_path, bert_dir, 2), start_new_session=True,
                            env=env_without_ray_address(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.exists() and len([p for p in markers.glob("*.json") if not p.name.startswith("_")]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len([p for p in markers.glob("*.json") if not p.name.startswith("_")])
    assert 3 <= n_done < 40
    assert not (markers / "_done.json").exists()
    st = subprocess.run([sys.executable, "-m", "retro_pipeline.cli", "status", "--workdir", str(wd)],
                        capture_output=True, text=True, check=True).stdout
    assert f"partial    {n_done} of 40 blocks" in st, st

    r = subprocess.run(cli(wd, prefix, gpt_tokenizer_path, bert_dir, rerun_workers), env=env_without_ray_address(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("train", "sampled", "valid"):
        assert (wd / "db" / "merged" / f"{name}.hdf5").read_bytes() == \
            (tmp_path / "ref" / "db" / "merged" / f"{name}.hdf5").read_bytes(), name
    assert (wd / "db" / "indexed_dataset_infos.json").read_text() == \
        (tmp_path / "ref" / "db" / "indexed_dataset_infos.json").read_text()
    import json

    done = json.loads((markers / "_done.json").read_text())
    assert done["blocks_run"] == 40 - n_done  # finished blocks were not recomputed
