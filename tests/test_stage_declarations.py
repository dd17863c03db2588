"""A new stage is one declaration: a toy stage defined here, with no edit anywhere else, gets its CLI
subcommand and help, config keys, fingerprint, status line, --force handling, a needs check, blocks of
several files, a finalize that runs as a Ray task, and its per-node worker cap."""

from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import pytest

from helpers import db_build_args, invoke
from retro_pipeline.io import atomic_path, write_json
from retro_pipeline.stage import Block, Option, Resources, Stage, block_ranges, register, unregister


class ToyCountStage(Stage):
    """Count each train document's chunks, times --toy-scale (a toy stage of the tests).

    Writes toy-count/<start>-<end>.counts.npy and .docs.npy per block of train documents, then total.json.
    """

    name = "toy-count"
    needs = ("db-build",)
    unit = "docs"
    resources = Resources(cpus=1, max_per_node=1)
    options = (
        Option("toy_scale", int, 2, "Multiply every count by this.", minimum=1),
        Option("toy_loud", bool, False, "Log each block (changes nothing).", changes_output=False),
    )

    def doc_ends(self) -> np.ndarray:
        with h5py.File(self.workdir.merged_db_path("train"), "r") as f:
            return f["doc_offsets"][:, 2].astype(np.int64)

    def plan(self):
        n = len(self.doc_ends())
        d = self.workdir.stage_dir(self.name)
        return [Block(f"{s}-{e}", s, e, (str(d / f"{s}-{e}.counts.npy"), str(d / f"{s}-{e}.docs.npy")))
                for s, e in block_ranges(n, 3)]

    def outputs(self):
        return [self.workdir.stage_dir(self.name)]

    def final_outputs(self):
        return [self.workdir.stage_dir(self.name) / "total.json"]

    def process(self, block, state):
        began = time.time()
        ends = self.doc_ends()
        counts = np.diff(np.concatenate([[0], ends]))[block.start:block.end] * self.cfg.toy_scale
        for path, arr in zip(block.paths, (counts, np.arange(block.start, block.end))):
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
        return {"pid": os.getpid(), "began": began, "ended": time.time()}

    def finalize(self, blocks, results):
        total = int(sum(np.load(b.paths[0]).sum() for b in blocks))
        write_json(self.final_outputs()[0], {"total": total})
        return {"n_total": total, "finalize_pid": os.getpid()}


@pytest.fixture()
def toy_stage():
    register(ToyCountStage)
    yield ToyCountStage
    unregister(ToyCountStage.name)


def db(wd, corpus, gpt, bert, *extra):
    return invoke(*db_build_args(wd, corpus, gpt, bert, *extra))


def expected_counts(wd, scale):
    with h5py.File(wd / "db" / "merged" / "train.hdf5", "r") as f:
        ends = f["doc_offsets"][:, 2].astype(np.int64)
    return np.diff(ends, prepend=0) * scale


def toy_counts(wd):
    files = sorted((wd / "toy-count").glob("*.counts.npy"), key=lambda p: int(p.name.split("-")[0]))
    return np.concatenate([np.load(p) for p in files])


def test_help_and_commands_come_from_the_declaration(toy_stage):
    top = invoke("--help")
    assert "toy-count" in top.output and "Count each train document's chunks" in top.output
    own = invoke("toy-count", "--help")
    assert own.exit_code == 0
    assert "--toy-scale" in own.output and "[default: 2]" in own.output and "--toy-loud" in own.output
    assert "--chunk-length" not in own.output and "--batch-size" not in own.output  # only its own options
    assert "total.json" in own.output  # the docstring's body is the long help
    build = invoke("build", "--help").output
    assert ", toy-count)" in " ".join(build.split()) and "--toy-scale" in build and "--chunk-length" in build
    assert "--toy-scale" not in invoke("db-build", "--help").output


def test_toy_stage_runs_is_stored_and_rebuilds_with_force(tmp_path, corpus, gpt_tokenizer_path, bert_dir, toy_stage):
    wd = tmp_path / "w"
    r = invoke("toy-count", "--workdir", wd, "--no-progress", "--executor", "local")
    assert r.exit_code == 2 and "toy-count needs db-build, which is not done" in r.stderr, r.output
    assert not wd.exists()

    assert db(wd, corpus, gpt_tokenizer_path, bert_dir).exit_code == 0
    r = invoke("toy-count", "--workdir", wd, "--no-progress", "--executor", "local", "--toy-loud")
    assert r.exit_code == 0, r.output
    assert "toy-count: done" in r.output
    np.testing.assert_array_equal(toy_counts(wd), expected_counts(wd, 2))
    assert json.loads((wd / "toy-count" / "total.json").read_text())["total"] == expected_counts(wd, 2).sum()

    stored = json.loads((wd / "config.json").read_text())
    assert stored["toy_scale"] == 2 and "toy_loud" not in stored  # output-changing keys only
    assert set(stored["fingerprints"]) >= {"db-build", "embed-sampled", "toy-count"}
    st = invoke("status", "--workdir", wd).output
    states = {line.split()[0]: line.split()[1] for line in st.splitlines()}
    assert states.pop("db-build") == "done" and states.pop("toy-count") == "done"
    assert set(states.values()) == {"not"} and "embed-sampled" in states  # every other stage: not started

    # another value of its option: refused, then rebuilt with --force; the stage it needs is left alone
    r = invoke("toy-count", "--workdir", wd, "--no-progress", "--executor", "local", "--toy-scale", 5)
    assert r.exit_code == 2 and "toy_scale: toy-count was built with 2, given 5" in r.stderr
    db_done = (wd / "markers" / "db-build" / "_done.json").read_bytes()
    r = invoke("toy-count", "--workdir", wd, "--no-progress", "--executor", "local", "--toy-scale", 5, "--force")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(toy_counts(wd), expected_counts(wd, 5))
    assert (wd / "markers" / "db-build" / "_done.json").read_bytes() == db_done
    assert json.loads((wd / "config.json").read_text())["toy_scale"] == 5

    # a changed upstream option invalidates everything downstream of it
    r = db(wd, corpus, gpt_tokenizer_path, bert_dir, "--chunk-length", 8, "--force")
    assert r.exit_code == 0, r.output
    assert not (wd / "toy-count").exists()
    assert "toy-count       not started" in invoke("status", "--workdir", wd).output

    # a rewritten input marks its stage and every stage downstream stale
    assert invoke("toy-count", "--workdir", wd, "--no-progress", "--executor", "local").exit_code == 0
    with open(corpus + ".bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x01\x02")
    st = invoke("status", "--workdir", wd).output
    assert "db-build        stale" in st and "toy-count       stale" in st and corpus + ".bin" in st


def test_finalize_runs_as_a_ray_task_and_workers_are_capped_per_node(tmp_path, corpus, gpt_tokenizer_path, bert_dir,
                                                                     toy_stage, ray_session):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    wd = tmp_path / "w"
    assert db(wd, corpus, gpt_tokenizer_path, bert_dir).exit_code == 0
    r = invoke("toy-count", "--workdir", wd, "--no-progress", "--num-workers", 2)
    assert r.exit_code == 0, r.output
    done = json.loads((wd / "markers" / "toy-count" / "_done.json").read_text())
    assert done["blocks"] >= 3 and done["finalize_pid"] != os.getpid()  # a worker of the cluster ran it
    counts = [json.loads(p.read_text())["counts"] for p in (wd / "markers" / "toy-count").glob("[0-9]*.json")]
    assert os.getpid() not in {c["pid"] for c in counts}  # workers of the cluster ran the blocks
    spans = sorted((c["began"], c["ended"]) for c in counts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one node, one block at a time on it, as declared
    np.testing.assert_array_equal(toy_counts(wd), expected_counts(wd, 2))
    # every file of every block is in its marker
    for p in (wd / "markers" / "toy-count").glob("[0-9]*.json"):
        m = json.loads(p.read_text())
        assert len(m["bytes"]) == 2 and all(os.path.getsize(f) == n for f, n in m["bytes"].items())


def test_a_memory_need_no_node_has_is_an_error_at_once(tmp_path, corpus, gpt_tokenizer_path, bert_dir, ray_session):
    import sys
    import time

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class HugeStage(ToyCountStage):
        """Needs more memory than any machine here has."""

        name = "toy-huge"
        options = ()
        resources = Resources(cpus=1, memory=1 << 50)

    register(HugeStage)
    try:
        wd = tmp_path / "w"
        assert db(wd, corpus, gpt_tokenizer_path, bert_dir).exit_code == 0
        t0 = time.time()
        r = invoke("toy-huge", "--workdir", wd, "--no-progress")
        assert r.exit_code == 2 and "a worker needs 1048576.0 GiB of memory" in r.stderr, r.output
        assert time.time() - t0 < 30 and not (wd / "toy-huge").exists()
    finally:
        unregister("toy-huge")
