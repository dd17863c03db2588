"""The engine's promises, in milliseconds: toy stages run in this process (the local executor, no Ray, no
corpus) through the same ``run_stages`` as every command. When options are bound to a workdir, what
``--force`` checks before it deletes, what a failed first run keeps, done-ness with missing files,
``--redo``, the stale-need hint, resuming after an interrupt, the registry's order and cycle checks,
fingerprint propagation and the option checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retro_pipeline import pipeline
from retro_pipeline.config import RunOptions, resolve
from retro_pipeline.errors import RetroError, StageFailed
from retro_pipeline.executor.base import LocalExecutor, run_stage
from retro_pipeline.io import atomic_path, read_json, write_json
from retro_pipeline.stage import Block, Option, Stage, all_stages, block_ranges, register, unregister
from retro_pipeline.workdir import Workdir

LOCAL = RunOptions(executor="local", progress=False)
FAIL = {}  # stage name -> block index at which process() raises (set by a test)
RUNS = []  # (stage, block name) of every process() call


class _Toy(Stage):
    def out(self) -> object:
        return self.workdir.stage_dir(self.name)

    def outputs(self):
        return [self.workdir.stage_dir(self.name)]

    def final_outputs(self):
        return [self.workdir.stage_dir(self.name) / "total.json"]

    def rows(self) -> int:
        return 10

    def plan(self):
        return [Block(f"{s:03d}-{e:03d}", s, e, str(self.out() / f"{s:03d}-{e:03d}.npy"))
                for s, e in block_ranges(self.rows(), 3)]

    def values(self, block) -> np.ndarray:
        raise NotImplementedError

    def process(self, block, state):
        RUNS.append((self.name, block.name))
        if FAIL.get(self.name) == block.start // 3:
            raise ValueError(f"{self.name} failed at block {block.name}")
        with atomic_path(block.path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.values(block))
        return {"rows": block.size}

    def finalize(self, blocks, results):
        total = int(sum(np.load(b.path).sum() for b in blocks))
        write_json(self.workdir.stage_dir(self.name) / "total.json", {"total": total})
        return {"n_total": total}


class ToyA(_Toy):
    """Numbers times --toy-a-n (an engine test's stage)."""

    name = "toy-a"
    options = (Option("toy_a_n", int, 2, "Multiplier.", minimum=1),)

    def values(self, block):
        return np.arange(block.start, block.end) * self.cfg.toy_a_n


class ToyB(_Toy):
    """toy-a's numbers plus --toy-b-k (an engine test's stage)."""

    name = "toy-b"
    needs = ("toy-a",)
    options = (Option("toy_b_k", int, 1, "Offset.", minimum=0),)

    def validate(self):
        if self.cfg.toy_b_k > 100:
            raise RetroError(f"--toy-b-k {self.cfg.toy_b_k}: at most 100 for toy-a's numbers")

    def values(self, block):
        a = ToyA(self.workdir, self.cfg)
        path = [b for b in a.plan() if b.name == block.name][0].path
        return np.load(path) + self.cfg.toy_b_k


@pytest.fixture(autouse=True)
def toys():
    register(ToyA)
    register(ToyB)
    FAIL.clear()
    RUNS.clear()
    yield
    unregister("toy-a")
    unregister("toy-b")


def run(wd, stages, force=False, redo=False, **given):
    return pipeline.run_stages(str(wd), stages, given, LOCAL, force=force, redo=redo)


def files(wd, stage) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((wd / stage).glob("*"))}


def stored(wd) -> dict:
    return json.loads((wd / "config.json").read_text())


# ---------------------------------------------------------------------- when options are bound


def test_options_of_a_stage_that_never_ran_are_free(tmp_path):
    wd = tmp_path / "w"
    run(wd, ["toy-a"], toy_a_n=3, toy_b_k=9)
    assert stored(wd)["toy_a_n"] == 3 and "toy_b_k" not in stored(wd)  # toy-b never ran: nothing bound
    run(wd, ["toy-b"], toy_b_k=5)  # any value: toy-b's options are free until it made something
    assert stored(wd)["toy_b_k"] == 5
    assert json.loads((wd / "toy-b" / "total.json").read_text())["total"] == sum(range(10)) * 3 + 10 * 5
    with pytest.raises(RetroError, match=r"toy_b_k: toy-b was built with 5, given 7"):
        run(wd, ["toy-b"], toy_b_k=7)
    with pytest.raises(RetroError, match=r"toy_a_n: toy-a was built with 3, given 4"):
        run(wd, ["toy-b"], toy_a_n=4)


def test_a_failed_first_run_keeps_nothing(tmp_path):
    wd = tmp_path / "w"
    FAIL["toy-a"] = 0
    with pytest.raises(StageFailed, match="toy-a failed at block 000-003"):
        run(wd, ["toy-a"], toy_a_n=3)
    # a first run that made nothing leaves no workdir, but for the log that the error line points at (with the
    # traceback of stage code, under the CLI's logging: tests/test_new_user.py)
    assert sorted(p.name for p in wd.iterdir()) == ["logs"]
    with pytest.raises(RetroError, match="unknown option"):
        run(wd, ["toy-a"], toy_zz=3)
    assert not wd.exists()  # a one-line error: nothing kept

    FAIL.clear()
    run(wd, ["toy-a"], toy_a_n=3)
    FAIL["toy-b"] = 0
    with pytest.raises(StageFailed):
        run(wd, ["toy-b"], toy_b_k=5)
    assert "toy_b_k" not in stored(wd) and not (wd / "toy-b").exists()  # the failed value is not kept
    assert Workdir(wd).stage_status("toy-b")["state"] == "not started"
    FAIL.clear()
    run(wd, ["toy-b"], toy_b_k=6)  # another value: no conflict with the failed run
    assert stored(wd)["toy_b_k"] == 6


def test_a_failure_after_a_finished_block_binds_the_options(tmp_path):
    wd = tmp_path / "w"
    FAIL["toy-a"] = 2  # blocks 0 and 1 finish
    with pytest.raises(StageFailed):
        run(wd, ["toy-a"], toy_a_n=3)
    st = Workdir(wd).stage_status("toy-a")
    assert st["state"] == "partial" and st["blocks_done"] == 2 and st["blocks_total"] == 4
    assert stored(wd)["toy_a_n"] == 3
    with pytest.raises(RetroError, match="toy_a_n: toy-a was built with 3, given 4"):
        run(wd, ["toy-a"], toy_a_n=4)  # its blocks were made with 3: resuming with 4 would mix them
    FAIL.clear()
    RUNS.clear()
    run(wd, ["toy-a"])
    assert [b for _, b in RUNS] == ["006-009", "009-010"]  # resumed: only the blocks not done


# ---------------------------------------------------------------------- --force and --redo


def test_force_checks_everything_before_it_deletes(tmp_path):
    wd = tmp_path / "w"
    run(wd, ["toy-a", "toy-b"], toy_a_n=3, toy_b_k=5)
    before = files(wd, "toy-b")
    with pytest.raises(RetroError, match="--toy-b-k 500: at most 100"):
        run(wd, ["toy-b"], force=True, toy_b_k=500)
    assert files(wd, "toy-b") == before and stored(wd)["toy_b_k"] == 5  # nothing deleted, nothing stored
    assert Workdir(wd).stage_status("toy-b")["state"] == "done"
    run(wd, ["toy-b"], force=True, toy_b_k=6)
    assert stored(wd)["toy_b_k"] == 6 and files(wd, "toy-b") != before


def test_force_on_a_stage_whose_need_is_stale_says_stale_and_why(tmp_path):
    wd = tmp_path / "w"
    run(wd, ["toy-a", "toy-b"], toy_a_n=3)
    before = files(wd, "toy-a")
    with pytest.raises(RetroError, match=r"toy-b needs toy-a, which is stale \(its toy-a-n changed\) and this "
                                         r"command does not run it"):
        run(wd, ["toy-b"], force=True, toy_a_n=4)
    assert files(wd, "toy-a") == before  # refused before anything went
    run(wd, ["toy-a", "toy-b"], force=True, toy_a_n=4)
    assert json.loads((wd / "toy-b" / "total.json").read_text())["total"] == sum(range(10)) * 4 + 10


def test_force_with_nothing_changed_rebuilds_nothing_and_redo_recomputes(tmp_path):
    wd = tmp_path / "w"
    run(wd, ["toy-a", "toy-b"])
    RUNS.clear()
    out = run(wd, ["toy-a"], force=True)
    assert RUNS == [] and out["toy-a"]["already_done"]
    a, b = files(wd, "toy-a"), files(wd, "toy-b")
    out = run(wd, ["toy-a"], redo=True)
    assert sorted(RUNS) == [("toy-a", x) for x in ("000-003", "003-006", "006-009", "009-010")]
    assert files(wd, "toy-a") == a
    assert Workdir(wd).stage_status("toy-b")["state"] == "not started"  # made from what was redone: rebuilt
    assert not (wd / "toy-b").exists()
    run(wd, ["toy-b"])
    assert files(wd, "toy-b") == b


# ---------------------------------------------------------------------- done = marker + files


def test_a_done_stage_with_a_missing_file_is_partial_and_a_rerun_makes_exactly_it(tmp_path):
    wd = tmp_path / "w"
    run(wd, ["toy-a", "toy-b"])
    a = files(wd, "toy-a")
    (wd / "toy-a" / "003-006.npy").unlink()
    st = Workdir(wd).stage_status("toy-a")
    assert st["state"] == "partial" and st["blocks_done"] == 3 and st["missing"][0].endswith("003-006.npy")
    with pytest.raises(RetroError, match=r"toy-b needs toy-a, which has 1 missing file\(s\), e\.g\. .*003-006"):
        run(wd, ["toy-b"], redo=True)
    RUNS.clear()
    out = run(wd, ["toy-a"])
    assert RUNS == [("toy-a", "003-006")] and out["toy-a"]["blocks_run"] == 1
    assert files(wd, "toy-a") == a

    (wd / "toy-a" / "total.json").write_text("{}")  # a final output of another size
    assert Workdir(wd).stage_status("toy-a")["state"] == "partial"
    RUNS.clear()
    run(wd, ["toy-a"])
    assert RUNS == [] and files(wd, "toy-a") == a  # no block to redo: finalize alone made it again


def test_a_resumed_stage_reports_its_whole_time(tmp_path):
    wd = tmp_path / "w"
    FAIL["toy-a"] = 2
    with pytest.raises(StageFailed):
        run(wd, ["toy-a"])
    spent = read_json(wd / "markers" / "toy-a" / "_time.json")["seconds"]
    FAIL.clear()
    done = run(wd, ["toy-a"])["toy-a"]
    assert done["blocks_run"] == 2 and done["blocks"] == 4
    assert done["seconds"] >= spent + done["seconds_this_run"] - 1e-3


class _Interrupting(LocalExecutor):
    """Processes ``n`` blocks, then raises KeyboardInterrupt (Ctrl-C between blocks)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def run(self, stage, blocks, on_result):
        def counted(block, result):
            on_result(block, result)
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt

        super().run(stage, blocks, counted)


def test_run_stage_resumes_after_an_interrupt_with_the_same_bytes(tmp_path):
    ref = tmp_path / "ref"
    run(ref, ["toy-a"], toy_a_n=5)
    wd = tmp_path / "w"
    run(wd, ["toy-a"], toy_a_n=5)
    for p in (wd / "toy-a").glob("*"):
        p.unlink()
    import shutil

    shutil.rmtree(wd / "markers" / "toy-a")
    cfg = pipeline.load_config(wd)
    stage = ToyA(Workdir(wd), cfg)
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, _Interrupting(1), progress=False)
    assert Workdir(wd).stage_status("toy-a")["blocks_done"] == 1
    RUNS.clear()
    done = run_stage(ToyA(Workdir(wd), cfg), LocalExecutor(), progress=False)
    assert done["blocks_run"] == 3 and len(RUNS) == 3
    assert files(wd, "toy-a") == files(ref, "toy-a")


# ---------------------------------------------------------------------- the registry and fingerprints


def test_stage_order_follows_needs_and_cycles_and_unknown_needs_are_errors():
    names = [c.name for c in all_stages()]
    assert names.index("toy-a") < names.index("toy-b")
    assert names.index("db-build") < names.index("embed-sampled") < names.index("index-train") < \
        names.index("index-add") < names.index("query-neighbors")

    class P(Stage):
        name = "toy-p"
        needs = ("toy-q",)

    class Q(Stage):
        name = "toy-q"
        needs = ("toy-p",)

    class R(Stage):
        name = "toy-r"
        needs = ("nowhere",)

    register(P)
    register(Q)
    try:
        with pytest.raises(TypeError, match="toy-p, toy-q need each other in a cycle"):
            all_stages()
    finally:
        unregister("toy-p")
        unregister("toy-q")
    register(R)
    try:
        with pytest.raises(TypeError, match="toy-r needs 'nowhere', which no stage declares"):
            all_stages()
    finally:
        unregister("toy-r")

    class S(Stage):
        name = "toy-s"
        options = (Option("toy_a_n", int, 1, "Same name, another declaration."),)

    register(S)
    try:
        with pytest.raises(TypeError, match="--toy-a-n is declared by both toy-a and toy-s"):
            all_stages()
    finally:
        unregister("toy-s")


def test_fingerprints_follow_own_options_and_upstream_only():
    base, _ = resolve({}, {})
    fp = pipeline.fingerprints(base)
    a3, _ = resolve({}, {"toy_a_n": 3})
    b9, _ = resolve({}, {"toy_b_k": 9})
    assert pipeline.fingerprints(a3)["toy-a"] != fp["toy-a"]
    assert pipeline.fingerprints(a3)["toy-b"] != fp["toy-b"]  # through its need
    assert pipeline.fingerprints(b9)["toy-a"] == fp["toy-a"]  # downstream options don't reach upstream
    assert pipeline.fingerprints(b9)["toy-b"] != fp["toy-b"]
    assert pipeline.fingerprints(a3)["db-build"] == fp["db-build"]  # an unrelated chain


# ---------------------------------------------------------------------- option checks


@pytest.mark.parametrize("opt,value,message", [
    (Option("n", int, 1, "", minimum=1), 0, "--n 0: must be at least 1"),
    (Option("n", int, 1, "", minimum=0, open_minimum=True), 0, "--n 0: must be above 0"),
    (Option("r", float, 0.5, "", maximum=1), 5, "--r 5.0: must be at most 1"),
    (Option("n", int, 1, ""), 2.5, "--n 2.5: not an integer"),
    (Option("n", int, 1, ""), True, "--n True: not an integer"),
    (Option("x", float, 1.0, ""), "abc", "--x 'abc': not a number"),
    (Option("b", bool, False, ""), "yes", "--b 'yes': give true or false"),
    (Option("c", str, "a", "", choices=("a", "b")), "z", "--c 'z': choose one of a, b"),
])
def test_option_checks_refuse_with_the_flag_named(opt, value, message):
    with pytest.raises(RetroError) as e:
        opt.check(value)
    assert str(e.value) == message


def test_option_checks_accept_and_normalize(tmp_path):
    assert Option("n", int, 1, "").check(4.0) == 4 and Option("x", float, 1.0, "").check("2.5") == 2.5
    assert Option("n", int, 1, "", minimum=1).check(None) is None
    (tmp_path / "f").write_text("x")
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert Option("p", str, None, "", path=True).check("f") == str(tmp_path / "f")
        assert Option("p", str, None, "", path=True).check("hub/id") == "hub/id"  # not a file: kept as given
    finally:
        os.chdir(here)
    assert Option("u", str, "a", "", normalize=str.upper).check("b") == "B"


def test_unknown_options_and_stages_are_one_line_errors(tmp_path):
    with pytest.raises(RetroError, match="unknown option\\(s\\) toy_zz"):
        run(tmp_path / "w", ["toy-a"], toy_zz=1)
    with pytest.raises(RetroError, match="unknown stage 'toy-zz'"):
        run(tmp_path / "w", ["toy-zz"])
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------- worker logs and Ray's log dispatcher


def test_warnings_before_a_failure_travel_with_it():
    import logging

    from retro_pipeline.logs import replay, run_capturing_logs

    def work():
        logging.getLogger("retro_pipeline.test").warning("odd input in block 3")
        raise ValueError("boom")

    with pytest.raises(ValueError) as e:
        run_capturing_logs(work)
    records = e.value.retro_log_records
    assert [(n, lvl, m) for n, lvl, m in records] == [("retro_pipeline.test", logging.WARNING, "odd input in block 3")]
    import pickle

    assert pickle.loads(pickle.dumps(e.value)).retro_log_records == records  # as Ray ships it to the driver
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    logging.getLogger("retro_pipeline").addHandler(h)
    try:
        replay(records)
    finally:
        logging.getLogger("retro_pipeline").removeHandler(h)
    assert seen == ["odd input in block 3"]


def test_the_ray_log_filter_fails_soft_on_another_layout(monkeypatch):
    import ray._private.ray_logging as ray_logging

    from embedder.ray_session import drop_ray_noise

    class Other:  # a dispatcher without the private attributes the filter uses
        pass

    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", Other())
    drop_ray_noise()  # no exception: lines are printed as Ray prints them
    monkeypatch.delattr(ray_logging, "global_worker_stdstream_dispatcher")
    drop_ray_noise()
