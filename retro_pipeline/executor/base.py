"""Running a stage: skip finished blocks, process the rest on an executor, finalize once, mark done.

The executor owns everything around the stage code: completion markers (written last, with counts and the
block file's size), retries of lost workers, progress bars and timing. A block is done when its marker exists
and its file has the size the marker records; anything else is recomputed, so a run killed at any moment
and started again gives the same outputs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from retro_pipeline.errors import StageFailed, UserError
from retro_pipeline.io import read_json, sweep_temporaries, write_json
from retro_pipeline.stage import Block, Stage

log = logging.getLogger(__name__)

OnResult = Callable[[Block, dict], None]

# Retries for failures of the machinery (a lost worker, actor or node). An exception raised by stage code
# is never retried: it would fail the same way again.
INFRA_RETRIES = 10


def marker_path(markers_dir: Path, block: Block) -> Path:
    return markers_dir / (block.name.replace("/", "__") + ".json")


def run_block(stage: Stage, block: Block, state: Any) -> dict[str, Any]:
    """Process one block and describe its output for the completion marker."""
    t0 = time.perf_counter()
    counts = stage.process(block, state) or {}
    size = os.path.getsize(block.path)
    return {"block": block.name, "path": block.path, "bytes": size,
            "counts": counts, "seconds": round(time.perf_counter() - t0, 3), "host": os.uname().nodename}


def block_is_done(markers_dir: Path, block: Block) -> dict | None:
    m = read_json(marker_path(markers_dir, block))
    if m is None:
        return None
    try:
        if os.path.getsize(block.path) != m.get("bytes"):
            return None
    except OSError:
        return None
    return m


class LocalExecutor:
    """Runs blocks one after another in this process: no Ray, nothing to start; for debugging and tests."""

    name = "local"

    def __init__(self, num_threads: int | None = None):
        self.num_threads = num_threads

    def run(self, stage: Stage, blocks: list[Block], on_result: OnResult) -> None:
        if not blocks:
            return
        state = stage.setup({"num_cpus": self.num_threads or os.cpu_count() or 1, "num_gpus": 0})
        for block in blocks:
            try:
                result = run_block(stage, block, state)
            except UserError:
                raise
            except Exception as e:  # stage code: it would fail the same way again
                log.debug("[%s] block %s failed", stage.name, block.name, exc_info=True)
                raise StageFailed(f"[{stage.name}] block {block.name} failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
            on_result(block, result)


def run_stage(stage: Stage, markers_dir: Path, executor, progress: bool = True) -> dict[str, Any]:
    """Run ``stage`` to completion with ``executor``; returns the done marker's content."""
    done_path = markers_dir / "_done.json"
    done = read_json(done_path)
    if done is not None and all(p.exists() for p in stage.final_outputs()):
        log.info("[%s] already done", stage.name)
        return done
    t0 = time.perf_counter()
    stage.check()
    swept = sweep_temporaries(*stage.output_dirs())
    if swept:
        log.info("[%s] removed %d temporary file(s) left by an interrupted run", stage.name, swept)
    blocks = stage.plan()
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise RuntimeError(f"stage {stage.name} planned duplicate block names")
    markers_dir.mkdir(parents=True, exist_ok=True)
    write_json(markers_dir / "_plan.json", {"blocks": names, "rows": sum(b.size for b in blocks)})

    results: dict[str, dict] = {}
    todo: list[Block] = []
    for b in blocks:
        m = block_is_done(markers_dir, b)
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
        write_json(marker_path(markers_dir, block), result)
        results[block.name] = result
        if bar is not None:
            bar.update(block.size)
            bar.set_postfix_str(f"blocks {len(results)}/{len(blocks)}", refresh=False)

    try:
        executor.run(stage, todo, on_result)
    finally:
        if bar is not None:
            bar.close()
    summary = stage.finalize(blocks, results) or {}
    done = {"stage": stage.name, "blocks": len(blocks), "blocks_run": len(todo),
            "seconds": round(time.perf_counter() - t0, 3), **summary}
    write_json(done_path, done)
    return done
