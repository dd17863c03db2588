"""Running a stage: skip finished blocks, process the rest on an executor, finalize once, mark done.

The executor owns everything around the stage code: completion markers (written last, with counts and the
size of each of the block's files), retries of lost workers, progress bars and timing. A block is done when
its marker exists and its files have the sizes the marker records; anything else is recomputed, so a run
killed at any moment and started again gives the same outputs. A stage's finalize is a one-off job that
the executor runs where the stage's resources are (a Ray task on a cluster).

Timing goes to the workdir's timeline (``W/logs/timeline.jsonl``, :class:`Timeline`): one JSON line per
finished block (its worker's host, process and GPU, when it started and ended, rows and bytes), per stage
run (start; end with its wall time, one-off job time, retries and lost workers) and per lost worker, each
tagged with the id of the command run that wrote it. Only the driver appends to it, as it alone writes
markers; ``retro-pipeline report`` draws it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
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


# ---------------------------------------------------------------------- the timeline


def timeline_path(root: str | os.PathLike) -> Path:
    """The timeline of the workdir ``root``: beside the command logs, so it is kept where they are."""
    return Path(root) / "logs" / "timeline.jsonl"


def new_run_id() -> str:
    """An id for one command run: when it started, its process, and random bits (two runs never share one)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Timeline:
    """The workdir's append-only timeline, as one command run (``run``) writes it: one JSON object a line.

    Appends are single writes to a file opened for appending, by the driver alone; a line that a kill cut
    short is skipped by :func:`read_timeline`, and the next run starts its lines on a line of their own. A
    timeline that cannot be written is a debug record, never a failed build: it is a record of the build,
    not an output of it."""

    def __init__(self, root: str | os.PathLike, run: str | None = None):
        self.path = timeline_path(root)
        self.run = run or new_run_id()
        self._started = False
        self._failed = False

    def append(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "run": self.run, "time": round(time.time(), 3), **fields}
        line = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if not self._started:  # a line cut short by a kill ends there, not inside our first line
                    self._started = True
                    if f.seek(0, os.SEEK_END) > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            line = b"\n" + line
                f.write(line)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.debug("cannot append to the timeline %s: %s", self.path, e)


def read_timeline(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every whole record of a timeline file, in the order written ([] where there is none); lines that are
    not a JSON object (one cut short by a kill) are skipped."""
    out = []
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict) and "event" in rec:
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def _gpu() -> str | None:
    """The GPU this process computes on (its id as the node numbers it), or None where it has used none."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        i = torch.cuda.current_device()
    except Exception:  # noqa: BLE001 - a record, never a failure
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[i] if i < len(visible) else str(i)


# ---------------------------------------------------------------------- blocks


def run_group(stage: Stage, blocks: list[Block], state: Any, todo: list[str] | None = None) -> list[dict[str, Any]]:
    """Process a group of blocks (one, for most stages), making the blocks named ``todo`` (None = all), and
    describe each one's output for its completion marker; the group's time is shared by block sizes, and so
    is its wall-clock span (``start``, ``end``: consecutive slices of it, for the timeline)."""
    t0 = time.perf_counter()
    wall0 = time.time()
    slowpoint(f"{stage.name}:block")
    made = blocks if todo is None else [b for b in blocks if b.name in set(todo)]
    counts = stage.process_group(blocks, state, None if todo is None else made)
    if len(counts) != len(made):
        raise RuntimeError(f"stage {stage.name}: process_group returned {len(counts)} results for {len(made)} "
                           f"blocks")
    seconds = time.perf_counter() - t0
    rows = sum(b.size for b in made) or 1
    run = stage.run_record(state)
    group = [blocks[0].name, blocks[-1].name] if len(blocks) > 1 else None
    out = []
    at, gpu = 0, _gpu()
    for b, c in zip(made, counts):
        sizes = {p: os.path.getsize(p) for p in b.paths}
        start, at = wall0 + seconds * at / rows, at + b.size
        m = {"block": b.name, "paths": list(b.paths), "bytes": sizes, "counts": c or {}, "run": run,
             "seconds": round(seconds * b.size / rows, 3), "host": os.uname().nodename,
             "worker": {"pid": os.getpid(), "gpu": gpu, "start": round(start, 3),
                        "end": round(wall0 + seconds * at / rows, 3)}}
        if group:
            m["group"] = group  # embedded together with these blocks (first, last)
        out.append(m)
    return out


def run_block(stage: Stage, block: Block, state: Any) -> dict[str, Any]:
    """Process one block alone (a group of one) and describe its output for the completion marker."""
    return run_group(stage, [block], state)[0]


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

    def run(self, stage: Stage, groups: list[tuple[list[Block], list[str]]], on_result: OnResult) -> None:
        """Process ``groups`` ((blocks of a group, see ``Stage.groups``; the names of those to make)) and report
        each made block's result."""
        if not groups:
            return
        state = stage.setup({"num_cpus": self.num_threads or os.cpu_count() or 1, "num_gpus": 0})
        for group, todo in groups:
            what = f"block {group[0].name}" if len(group) == 1 else f"blocks {group[0].name}..{group[-1].name}"
            made = [b for b in group if b.name in set(todo)]
            for block, result in zip(made, self._call(stage, what, run_group, stage, group, state, todo)):
                on_result(block, result)

    def run_once(self, stage: Stage, what: str, fn, *args) -> Any:
        """A one-off job of ``stage`` (e.g. its finalize): here, in this process."""
        return self._call(stage, what, fn, *args)

    def serve(self, stage: Stage):
        """The stage's services while its blocks run: none here (its workers do that work themselves)."""
        return contextlib.nullcontext()

    def run_once_many(self, stage: Stage, jobs: list[tuple[str, Any, tuple]]) -> list[Any]:
        """Several one-off jobs ``(what, fn, args)``: here, one after the other."""
        return [self.run_once(stage, what, fn, *args) for what, fn, args in jobs]

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


def run_stage(stage: Stage, executor, progress: bool = True, timeline: Timeline | None = None) -> dict[str, Any]:
    """Run ``stage`` to completion with ``executor``; returns the done marker's content (with ``already_done``
    where there was nothing to do). A stage whose done marker stands but some of whose recorded files are
    gone is run again: exactly the missing blocks, then its finalize. ``timeline``: where this command run
    records its timing (default: a run of its own in the workdir's timeline)."""
    wd = stage.workdir
    markers_dir = wd.markers_dir(stage.name)
    done_path = wd.done_marker(stage.name)
    st = wd.stage_status(stage.name)
    if st["state"] == "done" and all(p.exists() for p in stage.final_outputs()):
        log.info("[%s] already done", stage.name)
        return {**st, "already_done": True}
    if st["state"] == "done":  # a done marker of an earlier version, without its outputs' sizes
        st = {**st, "missing": [str(p) for p in stage.final_outputs() if not p.exists()]}
    if st.get("missing"):
        first = st["missing"][0]
        log.warning("[%s] %d recorded file(s) are gone or changed size (%s%s): making them again", stage.name,
                    len(st["missing"]), first, ", ..." if len(st["missing"]) > 1 else "")
        done_path.unlink(missing_ok=True)
    time_path = markers_dir / "_time.json"
    before = float((read_json(time_path) or {}).get("seconds", 0.0))
    t0 = time.perf_counter()
    tl = timeline or Timeline(wd.root)
    acct: dict[str, Any] = {"once": 0.0, "started": False, "stats": dict(getattr(executor, "stats", {}) or {})}
    previous = getattr(executor, "on_event", None)
    executor.on_event = lambda event, **f: tl.append(event, stage=stage.name, **f)
    ended = "stopped"
    try:
        out = _run_stage(stage, executor, progress, before, t0, tl, acct)
        ended = "done"
        return out
    except BaseException as e:
        ended = f"stopped: {type(e).__name__}"
        raise
    finally:
        executor.on_event = previous
        if markers_dir.exists() and not done_path.exists():  # the time an interrupted run spent, for the total
            write_json(time_path, {"seconds": round(before + time.perf_counter() - t0, 3)})
        if acct["started"]:
            stats = getattr(executor, "stats", {}) or {}
            tl.append("stage_end", stage=stage.name, state=ended, wall=round(time.perf_counter() - t0, 3),
                      once=round(acct["once"], 3), executor=getattr(executor, "name", type(executor).__name__),
                      **{k: int(stats.get(k, 0)) - int(acct["stats"].get(k, 0)) for k in ("retries", "lost")})


def _run_stage(stage: Stage, executor, progress: bool, before: float, t0: float, tl: Timeline,
               acct: dict[str, Any]) -> dict[str, Any]:
    wd = stage.workdir
    markers_dir = wd.markers_dir(stage.name)
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
    for b in blocks:
        m = block_is_done(wd.block_marker(stage.name, b.name), b)
        if m is not None:
            results[b.name] = m
    if results:
        log.info("[%s] resuming: %d of %d blocks already done", stage.name, len(results), len(blocks))
    tl.append("stage_start", stage=stage.name, blocks=len(blocks), blocks_done=len(results),
              rows=sum(b.size for b in blocks), unit=stage.unit)
    acct["started"] = True
    groups = stage.groups(blocks)
    if [b.name for g in groups for b in g] != names:
        raise RuntimeError(f"stage {stage.name}: its groups do not cover its planned blocks in order")
    todo = [b for b in blocks if b.name not in results]
    todo_groups = [(g, [b.name for b in g if b.name not in results]) for g in groups
                   if any(b.name not in results for b in g)]

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        total = sum(b.size for b in todo)
        bar = tqdm(total=total, unit=f" {stage.unit}", unit_scale=total >= 10_000, desc=stage.bar_label(),
                   file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def on_result(block: Block, result: dict) -> None:
        write_json(wd.block_marker(stage.name, block.name), result)
        results[block.name] = result
        w = result.get("worker") or {}
        tl.append("block", stage=stage.name, block=block.name, rows=block.size,
                  bytes=sum((result.get("bytes") or {}).values()), host=result.get("host"), pid=w.get("pid"),
                  gpu=w.get("gpu"), start=w.get("start"), end=w.get("end"), group=result.get("group"))
        if bar is not None:
            bar.update(block.size)
            bar.set_postfix_str(f"blocks {len(results)}/{len(blocks)}", refresh=False)

    try:
        with executor.serve(stage):
            executor.run(stage, todo_groups, on_result)
    finally:
        if bar is not None:
            bar.close()
    note = stage.finalize_note()
    if note:
        log.info("[%s] %s", stage.name, note)
    t_once = time.perf_counter()
    try:
        jobs = stage.finalize_jobs(blocks, results)
        if jobs:
            executor.run_once_many(stage, jobs)
        summary = executor.run_once(stage, "finalize", finalize, stage, blocks, results)
    finally:
        acct["once"] = time.perf_counter() - t_once
    outputs = {str(p): (-1 if p.is_dir() else p.stat().st_size) for p in stage.final_outputs() if p.exists()}
    this_run = time.perf_counter() - t0
    done = {"stage": stage.name, "blocks": len(blocks), "blocks_run": len(todo),
            "seconds": round(before + this_run, 3), "seconds_this_run": round(this_run, 3), **summary,
            "outputs": outputs}
    write_json(wd.done_marker(stage.name), done)
    return done
