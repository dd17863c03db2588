"""Running a stage: skip finished blocks, process the rest on an executor, finalize once, mark done.

The executor owns everything around the stage code: completion markers (written last, with counts and the
size of each of the block's files), retries of lost workers, progress bars and timing. A block is done when
its marker exists and its files have the sizes the marker records; anything else is recomputed, so a run
killed at any moment and started again gives the same outputs. A stage's finalize is a one-off job that
the executor runs where the stage's resources are (a Ray task on a cluster).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from retro_pipeline.errors import StageFailed, UserError
from retro_pipeline.io import failpoint, read_json, slowpoint, sweep_temporaries, write_json
from retro_pipeline.stage import Block, Stage

log = logging.getLogger(__name__)

OnResult = Callable[[Block, dict], None]

# Retries for failures of the machinery (a lost worker, actor or node). An exception raised by stage code
# is never retried: it would fail the same way again.
INFRA_RETRIES = 10


def run_block(stage: Stage, block: Block, state: Any) -> dict[str, Any]:
    """Process one block and describe its output for the completion marker."""
    t0 = time.perf_counter()
    slowpoint(f"{stage.name}:block")
    counts = stage.process(block, state) or {}
    sizes = {p: os.path.getsize(p) for p in block.paths}
    return {"block": block.name, "paths": list(block.paths), "bytes": sizes, "counts": counts,
            "run": stage.run_record(state), "seconds": round(time.perf_counter() - t0, 3),
            "host": os.uname().nodename}


def block_is_done(marker: Path, block: Block) -> dict | None:
    """The block's marker if the block is done: the marker exists and every file has the size it records."""
    m = read_json(marker)
    if m is None:
        return None
    sizes = m.get("bytes")
    if isinstance(sizes, int) and len(block.paths) == 1:  # a marker of one file, as earlier versions wrote it
        sizes = {block.path: sizes}
    if not isinstance(sizes, dict) or set(sizes) != set(block.paths):
        return None
    try:
        if any(os.path.getsize(p) != sizes[p] for p in block.paths):
            return None
    except OSError:
        return None
    return m


def stage_failed(stage: Stage, what: str, e: BaseException) -> StageFailed:
    first = str(e).splitlines()[0] if str(e) else ""
    return StageFailed(f"[{stage.name}] {what} failed: {type(e).__name__}: {first}")


class LocalExecutor:
    """Runs blocks one after another in this process: no Ray, nothing to start; for debugging and tests."""

    name = "local"

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads

    def connect(self) -> None:
        """Nothing to start."""

    def run(self, stage: Stage, blocks: list[Block], on_result: OnResult) -> None:
        if not blocks:
            return
        state = stage.setup({"num_cpus": self.num_threads or os.cpu_count() or 1, "num_gpus": 0})
        for block in blocks:
            on_result(block, self._call(stage, f"block {block.name}", run_block, stage, block, state))

    def run_once(self, stage: Stage, what: str, fn, *args) -> Any:
        """A one-off job of ``stage`` (e.g. its finalize): here, in this process."""
        return self._call(stage, what, fn, *args)

    @staticmethod
    def _call(stage: Stage, what: str, fn, *args):
        try:
            return fn(*args)
        except UserError:
            raise
        except Exception as e:  # stage code: it would fail the same way again
            log.debug("[%s] %s failed", stage.name, what, exc_info=True)
            raise stage_failed(stage, what, e) from e


def finalize(stage: Stage, blocks: list[Block], results: dict[str, dict]) -> dict[str, Any]:
    failpoint(f"{stage.name}:finalize")
    slowpoint(f"{stage.name}:finalize")
    out = stage.finalize(blocks, results) or {}
    failpoint(f"{stage.name}:finalized")
    return out


def run_stage(stage: Stage, executor, progress: bool = True) -> dict[str, Any]:
    """Run ``stage`` to completion with ``executor``; returns the done marker's content."""
    wd = stage.workdir
    markers_dir = wd.markers_dir(stage.name)
    done_path = wd.done_marker(stage.name)
    done = read_json(done_path)
    if done is not None and all(p.exists() for p in stage.final_outputs()):
        log.info("[%s] already done", stage.name)
        return done
    t0 = time.perf_counter()
    stage.check()
    swept = sweep_temporaries(*[p for p in stage.outputs() if p.is_dir()])
    if swept:
        log.info("[%s] removed %d temporary file(s) left by an interrupted run", stage.name, swept)
    blocks = stage.plan()
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise RuntimeError(f"stage {stage.name} planned duplicate block names")
    markers_dir.mkdir(parents=True, exist_ok=True)
    write_json(wd.plan_marker(stage.name), {"blocks": names, "rows": sum(b.size for b in blocks)})

    results: dict[str, dict] = {}
    todo: list[Block] = []
    for b in blocks:
        m = block_is_done(wd.block_marker(stage.name, b.name), b)
        if m is None:
            todo.append(b)
        else:
            results[b.name] = m
    if results:
        log.info("[%s] resuming: %d of %d blocks already done", stage.name, len(results), len(blocks))

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(b.size for b in todo), unit=f" {stage.unit}", unit_scale=True,
                   desc=stage.name, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def on_result(block: Block, result: dict) -> None:
        write_json(wd.block_marker(stage.name, block.name), result)
        results[block.name] = result
        if bar is not None:
            bar.update(block.size)
            bar.set_postfix_str(f"blocks {len(results)}/{len(blocks)}", refresh=False)

    try:
        executor.run(stage, todo, on_result)
    finally:
        if bar is not None:
            bar.close()
    summary = executor.run_once(stage, "finalize", finalize, stage, blocks, results)
    done = {"stage": stage.name, "blocks": len(blocks), "blocks_run": len(todo),
            "seconds": round(time.perf_counter() - t0, 3), **summary}
    write_json(done_path, done)
    return done
