"""The embedding stage: Ray pool == local path bit for bit, == the encoder on the chunk texts, resumable."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import tokenizers

from helpers import write_corpus
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.read import read_embeddings
from retro_pipeline.tokenizers import load_gpt_tokenizer


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, gpt_tokenizer_path, corpus_texts):
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus", load_gpt_tokenizer(gpt_tokenizer_path),
                        corpus_texts[:30])


def given(prefix, gpt, model):
    return {"data_path": ["1", prefix], "gpt_tokenizer": gpt, "embedder": model, "chunk_length": 32,
            "block_size": 64, "index_ntrain": "300"}


def build(wd, prefix, gpt, model, device=None, pool=128, **run):
    """300 sampled chunks in blocks of 64 rows (the last 44), embedded in pools of about ``pool`` rows."""
    return run_stages(str(wd), ["db-build", "embed-sampled"], {**given(prefix, gpt, model), "batch_size": 16,
                                                               "device": device, "embed_pool": pool},
                      RunOptions(progress=False, **run))


@pytest.mark.slow  # Ray actor pools of 1 and 2 workers
def test_embeddings_match_encoder_and_are_worker_independent(tmp_path, prefix, gpt_tokenizer_path, tiny_bert_dir,
                                                            ray_session):
    from embedder import Encoder

    build(tmp_path / "local", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="local")
    local = read_embeddings(str(tmp_path / "local"))
    assert local.shape == (300, 32) and local.dtype == np.float32
    for n in (1, 2):
        out = build(tmp_path / f"ray{n}", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="ray", num_workers=n)
        assert out["embed-sampled"]["n_chunks"] == 300
        ray_emb = read_embeddings(str(tmp_path / f"ray{n}"))
        assert ray_emb.tobytes() == local.tobytes()  # bit for bit, whatever the worker count
    # independent reference: decode each sampled chunk with the plain tokenizer, embed the texts directly
    gpt = tokenizers.Tokenizer.from_file(gpt_tokenizer_path)
    from retro_pipeline.corpus import IndexedDataset

    ds = IndexedDataset(prefix)
    with h5py.File(tmp_path / "local" / "db" / "merged" / "sampled.hdf5", "r") as f:
        rows = f["chunks"][...]
    texts = [gpt.decode(ds.get(int(d), int(s), int(e - s)).tolist()) for _, d, s, e, _ in rows]
    enc = Encoder.load(tiny_bert_dir, device="cpu")
    want = enc.encode(texts, batch_size=7, sort_by_length=False)
    np.testing.assert_allclose(local, want, atol=1e-5)
    # one pool of all 300 (whatever the blocks): bit for bit the encoder over all the texts sorted at once
    one = build(tmp_path / "pool", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="local", pool=300)
    markers = sorted((tmp_path / "pool" / "markers" / "embed-sampled").glob("[0-9]*.json"))
    assert one["embed-sampled"]["blocks"] == len(markers) == 5
    assert all(json.loads(m.read_text())["group"] == ["000-064", "256-300"] for m in markers)
    assert read_embeddings(str(tmp_path / "pool")).tobytes() == enc.encode(texts, batch_size=16).tobytes()


def test_killed_embedding_resumes_by_pool_without_recomputing(tmp_path, prefix, gpt_tokenizer_path, tiny_bert_dir,
                                                      monkeypatch):
    from retro_pipeline.stages import embed as embmod

    real = embmod.EmbedSampledStage.process_group
    seen = []

    def dying(self, blocks, state, todo=None):  # pools of about 128 rows: blocks 000-192 together, then 192-300
        if seen:
            raise KeyboardInterrupt
        seen.extend(b.name for b in blocks)
        return real(self, blocks, state, todo)

    monkeypatch.setattr(embmod.EmbedSampledStage, "process_group", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "w", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="local", pool=128)
    assert seen == ["000-064", "064-128", "128-192"]
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w" / "embed" / "sampled").glob("*.hdf5")}
    assert len(done_before) == 3
    recomputed = []

    def counting(self, blocks, state, todo=None):
        recomputed.extend(b.name for b in blocks)
        return real(self, blocks, state, todo)

    monkeypatch.setattr(embmod.EmbedSampledStage, "process_group", counting)
    out = build(tmp_path / "w", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="local", pool=128)
    assert out["embed-sampled"]["blocks_run"] == 2 and recomputed == ["192-256", "256-300"]
    for name, mtime in done_before.items():  # finished blocks untouched
        assert (tmp_path / "w" / "embed" / "sampled" / name).stat().st_mtime_ns == mtime
    clean = build(tmp_path / "clean", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="local", pool=128)
    assert clean["embed-sampled"]["blocks"] == 5
    assert read_embeddings(str(tmp_path / "w")).tobytes() == read_embeddings(str(tmp_path / "clean")).tobytes()


@pytest.mark.slow  # a Ray pool with a worker that dies
@pytest.mark.parametrize("actors", [False, True], ids=["tasks", "actors"])  # CPU pools, GPU pools' path
def test_lost_ray_worker_is_retried(tmp_path, prefix, gpt_tokenizer_path, tiny_bert_dir, ray_session, actors):
    """A worker process that dies mid-block costs only that block: it is retried, the output is unchanged."""
    from retro_pipeline.executor.base import run_stage
    from retro_pipeline.executor.ray import RayExecutor
    from retro_pipeline.stages.embed import EmbedSampledStage
    from retro_pipeline.workdir import Workdir

    build(tmp_path / "clean", prefix, gpt_tokenizer_path, tiny_bert_dir, executor="local", pool=64)
    run_stages(str(tmp_path / "w"), ["db-build"], given(prefix, gpt_tokenizer_path, tiny_bert_dir),
               RunOptions(progress=False, executor="local"))
    flag = tmp_path / "die-once"
    flag.write_text("")

    class DyingStage(EmbedSampledStage):
        def process_group(self, blocks, state, todo=None):
            if blocks[0].start == 128 and os.path.exists(flag):
                os.unlink(flag)
                os._exit(1)  # the worker process vanishes mid-block
            return super().process_group(blocks, state, todo)

    from retro_pipeline.config import resolve

    wd = Workdir(tmp_path / "w")
    stage = DyingStage(wd, resolve(wd.stored(), {"batch_size": 16, "device": "cpu", "embed_pool": 64})[0])
    ex = RayExecutor(num_workers=2, actors=actors)
    done = run_stage(stage, ex, progress=False)
    # the dead worker's running block and the one queued behind it are retried; nothing else is
    assert 1 <= ex.stats["lost"] <= 2 and ex.stats["blocks"] == 5 and done["blocks_run"] == 5
    assert read_embeddings(str(wd.root)).tobytes() == read_embeddings(str(tmp_path / "clean")).tobytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_num_workers_caps_the_blocks_that_run_at_once(tmp_path, ray_session, workers):
    """--num-workers N on CPU workers (Ray tasks): never more than N blocks at once (each block's marker records
    its worker's start and end). It was twice N: each slot queued a second task, which ran beside the first."""
    import json
    import time

    from retro_pipeline.io import atomic_path
    from retro_pipeline.stage import Block, Stage, register, unregister

    class Sleepy(Stage):
        """Six blocks of 0.4 s each (a test's stage)."""

        name = "sleepy-test"

        def outputs(self):
            return [self.workdir.stage_dir(self.name)]

        def plan(self):
            d = self.workdir.stage_dir(self.name)
            return [Block(f"{i}", i, i + 1, str(d / f"{i}.txt")) for i in range(6)]

        def process(self, block, state):
            time.sleep(0.4)
            with atomic_path(block.path) as tmp:
                open(tmp, "w").write(block.name)
            return {}

        def finalize(self, blocks, results):
            return {}

    register(Sleepy)
    try:
        run_stages(str(tmp_path / "w"), ["sleepy-test"], {},
                   RunOptions(executor="ray", num_workers=workers, progress=False))
    finally:
        unregister("sleepy-test")
    spans = sorted((m["worker"]["start"], m["worker"]["end"]) for m in
                   (json.loads(p.read_text()) for p in (tmp_path / "w" / "markers" / "sleepy-test").glob("[0-9]*.json")))
    assert len(spans) == 6
    at_once = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert at_once == workers, spans


def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path, prefix, gpt_tokenizer_path, tiny_bert_dir,
                                                       ray_session):
    import torch

    from retro_pipeline.errors import RetroError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error under test cannot happen here")
    for executor in ("local", "ray"):
        with pytest.raises(RetroError, match="--device cuda: no CUDA device"):
            build(tmp_path / executor, prefix, gpt_tokenizer_path, tiny_bert_dir, executor=executor, device="cuda")
        assert not (tmp_path / executor / "markers" / "embed-sampled" / "_done.json").exists()
