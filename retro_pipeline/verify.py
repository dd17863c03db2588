"""verify: recompute a seeded random share of the blocks of every finished stage and compare them byte for byte.

Each picked block is processed again in this process (the stage's ``setup`` once, then ``process_group`` on
the block's whole group: blocks an encoder embedded together are recomputed together) with its files redirected into a scratch directory under the workdir (``W/.verify-<pid>-*``, removed at the end, on an
error and on Ctrl-C too): a copy of the :class:`Block` whose ``paths`` point there, so the stage code writes
exactly what it wrote for the build, and nowhere in the workdir. Every file is then compared with the
workdir's. Outputs are byte-deterministic (fixed HDF5 layouts, no timestamps, seeded choices), so equal
inputs give equal bytes; embeddings are float math, equal on the machine and device that made them, so a
workdir built elsewhere (another CPU, a GPU) may differ in its embedding-derived blocks without being broken.
Only blocks are recomputed: what a stage's ``finalize`` combines from them (merged DBs, trained and added
indexes) is not.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from retro_pipeline.errors import RetroError, UserError
from retro_pipeline.io import read_json
from retro_pipeline.workdir import Workdir


@dataclass
class StageCheck:
    """What verify did for one stage: ``checked`` of ``total`` blocks recomputed; the files that differ."""

    stage: str
    checked: int
    total: int
    differs: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.total:
            return f"{self.stage}: no blocks to recompute"
        head = f"{self.stage}: {self.checked} of {self.total} blocks recomputed"
        if not self.differs:
            return f"{head}, all identical"
        n = len(self.differs)
        return f"{head}, {n} file{'s' if n != 1 else ''} differ{'s' if n == 1 else ''}" + \
            "".join(f"\n  DIFFERS: {p}" for p in self.differs)


def pick(n: int, fraction: float, seed: int, stage: str) -> list[int]:
    """The seeded choice of ``fraction`` of ``n`` blocks (at least one), in plan order."""
    if not n:
        return []
    k = min(n, max(1, round(fraction * n)))
    return sorted(random.Random(f"{seed}:{stage}").sample(range(n), k))


def verify(workdir, fraction: float = 0.05, seed: int = 0, given: dict[str, Any] | None = None,
           on_stage: Callable[[StageCheck], None] | None = None, progress: bool = False) -> list[StageCheck]:
    """Recompute ``fraction`` of the blocks of every done stage of ``workdir`` (seeded by ``seed``) and compare
    their files with the workdir's; ``given`` sets options that don't change outputs (device, batch size)."""
    from retro_pipeline.config import resolve
    from retro_pipeline.pipeline import make_stage, status
    from retro_pipeline.stage import all_stages

    if not 0 < fraction <= 1:
        raise RetroError(f"--fraction {fraction:g}: give a share of the blocks above 0 and at most 1")
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if not wd.root.is_dir():
        raise RetroError(f"{wd.root}: no such workdir; pass the --workdir of a build")
    states = status(wd)
    done = [c for c in all_stages() if states[c.name]["state"] == "done"]
    if not done:
        raise RetroError(f"{wd.root}: no stage is done yet, nothing to verify; see 'retro-pipeline status "
                         f"--workdir {wd.root}'")
    stale = [c.name for c in done if states[c.name].get("stale")]
    if stale:
        raise RetroError(f"stage {stale[0]} is stale (made from what changed since: {states[stale[0]]['stale']}); "
                         f"verify recomputes from the current inputs, so rebuild it with --force first")
    cfg, _ = resolve(wd.stored(), given or {})
    out = []
    with wd.lock():
        scratch = Path(tempfile.mkdtemp(prefix=f".verify-{os.getpid()}-", dir=wd.root))
        try:
            for cls in done:
                stage = make_stage(cls, wd, cfg)
                recorded = recorded_run(stage, given or {})
                threads = recorded.pop("threads", None)   # not an option: the workers' CPU threads
                if recorded:  # embed as the build did (batch size, dtype, device), unless told otherwise
                    stage = make_stage(cls, wd, resolve(wd.stored(), {**recorded, **(given or {})})[0])
                check = verify_stage(stage, scratch, fraction, seed, progress, threads=threads)
                out.append(check)
                if on_stage is not None:
                    on_stage(check)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def recorded_run(stage, given: dict[str, Any]) -> dict[str, Any]:
    """The run options the stage's blocks were made with (their markers' ``run``), where the build used one
    setting for all; a recorded CUDA device becomes the CPU on a machine without one."""
    records = []
    for b in stage.plan():
        m = read_json(stage.workdir.block_marker(stage.name, b.name)) or {}
        records.append(m.get("run") or {})
    out = {k: v for k, v in records[0].items() if all(r.get(k) == v for r in records)} if records else {}
    if out.get("device") == "cuda" and "device" not in given:
        import torch

        if not torch.cuda.is_available():
            out["device"], out["dtype"] = "cpu", "float32"
    return out


def verify_stage(stage, scratch: Path, fraction: float, seed: int, progress: bool = False,
                 threads: int | None = None) -> StageCheck:
    """Recompute a seeded share of ``stage``'s blocks into ``scratch`` and compare them; ``threads``: the CPU
    threads the build's workers embedded with (their markers say), else every CPU here."""
    from retro_pipeline.executor.base import stage_failed

    wd: Workdir = stage.workdir
    blocks = stage.plan()
    planned = (read_json(wd.plan_marker(stage.name)) or {}).get("blocks")
    if planned is not None and [b.name for b in blocks] != planned:
        raise RetroError(f"stage {stage.name}: its blocks now differ from those it was built with "
                         f"({wd.plan_marker(stage.name)}); rebuild it with --force before verifying")
    picked = {blocks[i].name for i in pick(len(blocks), fraction, seed, stage.name)}
    groups = [g for g in stage.groups(blocks) if picked & {b.name for b in g}]
    picked = [b for g in groups for b in g]
    check = StageCheck(stage.name, len(picked), len(blocks))
    if not picked:
        return check

    def call(what, fn, *args):  # as the executors report stage code that fails
        try:
            return fn(*args)
        except UserError:
            raise
        except Exception as e:
            raise stage_failed(stage, what, e) from e

    state = call("setup", stage.setup, {"num_cpus": threads or os.cpu_count() or 1, "num_gpus": 0})
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=sum(b.size for b in picked), unit=f" {stage.unit}", unit_scale=True, leave=False,
                   desc=f"verify {stage.name}", file=sys.stderr, dynamic_ncols=True)
    here = scratch / "block"
    try:
        for group in groups:  # a picked block's whole group, as the build embedded them together
            copies = [replace(b, paths=tuple(str(here / str(i) / str(j) / Path(p).name) for j, p in enumerate(b.paths)))
                      for i, b in enumerate(group)]
            what = f"block {group[0].name}" if len(group) == 1 else f"blocks {group[0].name}..{group[-1].name}"
            call(what, stage.process_group, copies, as_built(stage, group[0], state))
            for b, copy in zip(group, copies):
                check.differs += [p for p, q in zip(b.paths, copy.paths) if not same_bytes(p, q)]
            shutil.rmtree(here)
            if bar is not None:
                bar.update(sum(b.size for b in group))
    finally:
        if bar is not None:
            bar.close()
    return check


def same_bytes(a: str, b: str) -> bool:
    """Whether files ``a`` (missing: no) and ``b`` hold the same bytes."""
    if not os.path.isfile(a) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as f, open(b, "rb") as g:
        while True:
            x, y = f.read(1 << 20), g.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def as_built(stage, block, state):
    """The worker state that recomputes ``block`` from the stage's inputs alone: index-add's --keep-embeddings
    cache (``embed/train/``) is neither read nor written (a block embedded afresh gives the same codes as one
    read back from it, so the recomputation checks the cache too)."""
    if isinstance(state, dict) and state.get("kept"):
        return {**state, "kept": False}
    return state
