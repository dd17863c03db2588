"""The README's main command, exactly as a user types it: the demo build with the packaged MiniLM on Ray."""

from __future__ import annotations

import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from helpers import env_without_ray_address, script
from megatron_ref import check_megatron_reads_workdir

pytestmark = pytest.mark.slow  # the demo build, with the packaged MiniLM: minutes


def test_readme_main_command(tmp_path):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "retro-pipeline build --workdir demo\n" in readme
    env = env_without_ray_address()
    r = subprocess.run([script("retro-pipeline"), "build", "--workdir", "demo", "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    wd = tmp_path / "demo"
    infos = json.loads((wd / "db" / "indexed_dataset_infos.json").read_text())
    assert infos[0]["n_docs"] > 700 and infos[0]["n_chunks"] > 4000
    with h5py.File(wd / "db" / "merged" / "sampled.hdf5", "r") as f:
        n_sampled = len(f["chunks"])
    parts = []
    for p in sorted((wd / "embed" / "sampled").glob("*.hdf5")):
        with h5py.File(p, "r") as f:
            parts.append(f["data"][...])
    emb = np.concatenate(parts)
    assert emb.shape == (n_sampled, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # MiniLM normalizes
    assert "train chunks in" in r.stdout and "[dataset 0 doc 0 tokens 0:64]" in r.stdout
    assert "neighbors of pretraining sample 0" in r.stdout and r.stdout.count("    neighbor [dataset 0 doc") >= 2
    st = subprocess.run([script("retro-pipeline"), "status", "--workdir", "demo"], cwd=tmp_path, capture_output=True,
                        text=True, check=True).stdout
    assert st.count(" done ") == 5
    dirs = json.loads((wd / "config.json").read_text())["retro_neighbor_dirs"]
    parts = [h5py.File(p, "r")["neighbors"][...] for p in sorted((wd / "query" / dirs["train"]).glob("*.hdf5"))]
    nb = np.concatenate(parts)
    assert nb.shape[1] == 20 and nb.shape[0] % 32 == 0 and nb.max() < infos[0]["n_chunks_train"] and (nb[:, 0] >= 0).all()
    # every train chunk embedded once; the default index reaches recall@10 >= 0.95 against exact search
    n_train = infos[0]["n_chunks_train"]
    assert f"chunks embedded: {n_train} (train DB: {n_train} chunks" in r.stdout
    search = json.loads(next((wd / "index").rglob("search.json")).read_text())
    assert search["recall@10"] >= 0.95 and search["n_queries"] == infos[0]["n_chunks"] - n_train
    # Megatron's own training path reads this workdir as the README's "Training with Megatron" says
    stored = json.loads((wd / "config.json").read_text())
    assert stored["retro_gpt_tokenizer_type"] == "GPT2BPETokenizer" and (wd / stored["retro_gpt_vocab_file"]).is_file()
    assert "--split 98,2,0" in readme and "--retro-project-dir" in readme
    assert check_megatron_reads_workdir(wd, "98,2,0", max_train=24) >= 24
