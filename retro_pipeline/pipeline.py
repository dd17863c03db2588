"""The Python API behind the CLI: open a workdir (config, fingerprints, inputs), then run stages in order.

Everything here comes from the stages' declarations (:mod:`retro_pipeline.stage`): the order, the options,
which stages an option or an input file affects, and what each stage needs first.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from retro_pipeline import config as cfgmod
from retro_pipeline.config import Config, RunOptions
from retro_pipeline.errors import RetroError
from retro_pipeline.stage import Stage, all_stages, downstream_of, fingerprint, owners
from retro_pipeline.workdir import Workdir

log = logging.getLogger(__name__)


def stage_order() -> list[str]:
    return [c.name for c in all_stages()]


def make_stage(cls: type[Stage], workdir: Workdir, cfg: Config, run: RunOptions | None = None) -> Stage:
    run = run or RunOptions()
    return cls(workdir, cfg, cpus=run.cpus_per_worker, gpus=run.gpus_per_worker)


def make_executor(run: RunOptions):
    if run.executor == "local":
        from retro_pipeline.executor.base import LocalExecutor

        return LocalExecutor()
    if run.executor == "ray":
        from retro_pipeline.executor.ray import RayExecutor

        return RayExecutor(address=run.address, num_workers=run.num_workers)
    raise RetroError(f"--executor {run.executor!r}: choose ray or local")


def fingerprints(cfg: Config) -> dict[str, str]:
    out: dict[str, str] = {}
    for cls in all_stages():
        out[cls.name] = fingerprint(cls, cfg, out)
    return out


def reading(wd: Workdir, cfg: Config, changed: dict[str, str]) -> dict[str, str]:
    """Stage name -> the first of the ``changed`` input files that it reads (stages reading none left out)."""
    out = {}
    for cls in all_stages():
        files = sorted({str(p) for p in make_stage(cls, wd, cfg).input_files()} & set(changed)) if changed else []
        if files:
            out[cls.name] = files[0]
    return out


@dataclass
class Opened:
    """A workdir as a command sees it: its config, the stages to rebuild, what to store."""

    workdir: Workdir
    cfg: Config
    fingerprints: dict[str, str]
    rebuild: list[str]
    locked: set[str]  # stages that made something: their options are the stored ones
    why: dict[str, str]  # stage -> why it is stale (its settings, an input file, an upstream stage)


def open_workdir(wd: Workdir, given: dict[str, Any], force: bool = False, redo=()) -> Opened:
    """Resolve the config of ``wd`` with ``given`` options and check it against what the workdir holds.

    An option is bound to the workdir once a stage that declares it has made something (a finished block);
    until then it is free and a command may give any value. Without ``force``, options that contradict
    what a stage was built with, a stage built with other settings, and an input file of a built stage that
    changed since it was recorded are one-line errors. With ``force`` they name the stages to rebuild: the
    stages the option or file belongs to, and every built stage downstream of them. ``redo`` names stages to
    rebuild although nothing changed (and the built stages downstream of them).
    """
    from retro_pipeline.fingerprints import changed_inputs, check_inputs

    stored = wd.stored()
    cfg, conflicts = cfgmod.resolve(stored, given)
    locked = {c.name for c in all_stages() if wd.has_outputs(c.name)}
    conflicts = [k for k in conflicts if set(owners(k)) & locked]
    if conflicts and not force:
        old, _ = cfgmod.resolve(stored, {})
        detail = "; ".join(f"{k}: {[s for s in owners(k) if s in locked][0]} was built with {_show(old[k])}, given "
                           f"{_show(cfg[k])}" for k in conflicts)
        raise RetroError(f"{wd.config_path}: this workdir was built with other settings ({detail}); use a new "
                         f"--workdir, or pass --force to rebuild the stages they affect")
    fps = fingerprints(cfg)
    old_fps = wd.stored_fingerprints()
    changed_fp = [s for s in stage_order() if s in locked and old_fps is not None
                  and old_fps.get(s) not in (None, fps[s])]
    every_changed = changed_inputs(stored.get("inputs") or {})  # records of stages that made nothing don't count
    read_changed = {s: f for s, f in reading(wd, cfg, dict(every_changed)).items() if s in locked}
    changed = [(f, what) for f, what in every_changed if f in read_changed.values()]
    why = _why_stale(cfg, conflicts, changed_fp, read_changed, dict(changed))
    if not force:
        check_inputs(changed, wd.root)
    if changed_fp and not force:
        first = changed_fp[0]
        raise RetroError(f"{wd.config_path}: stage {first} was built with other settings than this workdir's "
                         f"config now gives (the config was edited, or an upstream stage changed); pass --force to "
                         f"rebuild it, or use a new --workdir")
    rebuild = []
    roots = set(redo)
    if force:
        roots |= {s for k in conflicts for s in owners(k)} | set(changed_fp) | set(read_changed)
    if roots:
        rebuild = [s for s in stage_order() if s in downstream_of(roots) and
                   (s in locked or wd.stage_status(s)["state"] != "not started")]
    return Opened(wd, cfg, fps, rebuild, locked, why)


def _why_stale(cfg: Config, conflicts, changed_fp, read_changed: dict[str, str], changed: dict[str, str]):
    why: dict[str, str] = {}
    for cls in all_stages():
        own = [k for k in conflicts if k in cls.output_keys()]
        if cls.name in read_changed:
            why[cls.name] = f"{read_changed[cls.name]} {changed[read_changed[cls.name]]}"
        elif own:
            why[cls.name] = "its " + ", ".join(o.replace("_", "-") for o in own) + " changed"
        elif cls.name in changed_fp:
            why[cls.name] = "its settings changed"
        else:
            up = [n for n in cls.needs if n in why]
            if up:
                why[cls.name] = f"{up[0]} is stale ({why[up[0]]})"
    return why


def run_stages(workdir, stages: list[str], given: dict[str, Any] | None = None,
               run: RunOptions | None = None, force: bool = False, redo: bool = False,
               report: bool = False) -> dict[str, dict]:
    """Run ``stages`` (in pipeline order) for ``workdir`` with options ``given`` (any declared option).

    A stage stores its output-changing options and a record of the input files it reads in ``config.json``
    when it starts; a later run that contradicts them stops (or, with ``force``, rebuilds the stages they
    affect and those downstream), and one whose input files changed stops naming the file. A stage that
    fails before it made anything keeps nothing of its run (options, inputs, files). ``redo`` rebuilds
    ``stages`` (and the built stages downstream of them) although nothing changed. Every check runs before
    anything is deleted. A first run that fails before any stage made something leaves no workdir behind (only
    its log, where stage code failed: the error line points at its traceback).

    Each stage's timing goes to the workdir's timeline (``logs/timeline.jsonl``) under one run id for this
    call. ``report``: when every stage is done, end by writing ``W/report.html`` (``retro-pipeline report``);
    a report that cannot be written is a warning, never a failed build.
    """
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    created = not wd.root.exists() or {p.name for p in wd.root.iterdir()} <= {"logs", ".lock"}  # ours alone
    try:
        out = _run_stages(wd, stages, {k: v for k, v in (given or {}).items() if v is not None},
                          run or RunOptions(), force, redo, report)
    except BaseException as e:
        if created and not any(wd.has_outputs(s) for s in stage_order()):  # a failed first run leaves nothing
            from retro_pipeline.errors import UserError
            from retro_pipeline.logs import detach_workdir_log

            if isinstance(e, (UserError, KeyboardInterrupt)):  # said in full on the screen
                detach_workdir_log()
                shutil.rmtree(wd.root, ignore_errors=True)
            else:  # a failure of stage code: only its log (with the traceback the error line points to) stays
                for p in wd.root.iterdir():
                    if p.name != "logs":
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    return out


def _run_stages(wd: Workdir, stages, given, run: RunOptions, force: bool, redo: bool,
                report: bool = False) -> dict[str, dict]:
    from retro_pipeline.executor.base import Timeline
    from retro_pipeline.logs import attach_workdir_log

    unknown = [s for s in stages if s not in stage_order()]
    if unknown:
        raise RetroError(f"unknown stage {unknown[0]!r}; choose from {', '.join(stage_order())}")
    with wd.lock():
        attach_workdir_log(wd.root)
        log.debug("%s", " ".join(sys.argv) if sys.argv and sys.argv[0] else f"run_stages {stages} {given}")
        opened = open_workdir(wd, given, force, redo=stages if redo else ())
        cfg = opened.cfg
        classes = [c for c in all_stages() if c.name in stages]
        every = {c.name: make_stage(c, wd, cfg, run) for c in all_stages()}
        running = {c.name for c in classes}
        for cls in classes:
            for need in cls.needs:
                if need in running:
                    continue
                if need in opened.rebuild:
                    raise RetroError(f"{cls.name} needs {need}, which is stale ({opened.why.get(need, 'rebuilt')}) "
                                     f"and this command does not run it; run 'retro-pipeline build --workdir "
                                     f"{wd.root} --force' with the same options (or {need} first)")
                st = wd.stage_status(need)
                if st["state"] != "done":
                    what = "is not done" if not st.get("missing") else \
                        f"has {len(st['missing'])} missing file(s), e.g. {st['missing'][0]}"
                    raise RetroError(f"{cls.name} needs {need}, which {what} in {wd.root}; run "
                                     f"'retro-pipeline {need} --workdir {wd.root}' (or build) first")
        objs = [every[c.name] for c in classes]
        for st in objs:
            st.rebuilding = frozenset(opened.rebuild)
            st.validate()
        first = objs[0] if objs else None
        if first is not None and first.name not in opened.rebuild and not set(first.needs) & set(opened.rebuild):
            first.check()  # check the inputs before anything is deleted or stored
        executor = make_executor(run)
        if any(wd.stage_status(st.name)["state"] != "done" or st.name in opened.rebuild for st in objs):
            executor.connect()  # an unreachable cluster is an error before anything is written
        if opened.rebuild:
            log.info("--%s: rebuilding %s", "redo" if redo and not force else "force", ", ".join(opened.rebuild))
            wd.invalidate(opened.rebuild, {s: every[s].outputs() + every[s].final_outputs() for s in opened.rebuild})
        if first is not None:
            first.check()  # (once) a rebuilt stage's inputs, checked after its old outputs went
        bound = (opened.locked - set(opened.rebuild)) | running
        _store(wd, cfg, opened.fingerprints, every, bound, refresh=set(opened.rebuild))
        out = {}
        timeline = Timeline(wd.root)
        timeline.append("run_start", stages=[st.name for st in objs], executor=run.executor,
                        command=" ".join(sys.argv) if sys.argv and sys.argv[0] else "run_stages")
        for st in objs:
            out[st.name] = _run_one(wd, st, executor, run, cfg, opened, every, bound, timeline)
        if report and all(wd.stage_status(s)["state"] == "done" for s in stage_order()):
            write_build_report(wd)
        return out


def write_build_report(wd: Workdir):
    """``W/report.html`` at the end of a build; returns its path, or None (with a warning) where it could not
    be written: the build it reports on is finished all the same."""
    try:
        from retro_pipeline.report import write_report

        path = write_report(wd)
    except Exception as e:  # noqa: BLE001 - a report never fails a finished build
        log.debug("the build report failed", exc_info=True)
        log.warning("could not write the build report (%s: %s); 'retro-pipeline report --workdir %s' tries again",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "", wd.root)
        return None
    log.info("report: %s", path)
    return path


def _store(wd: Workdir, cfg: Config, fps: dict[str, str], every: dict[str, Stage], bound: set[str],
           refresh: set[str]) -> None:
    """Store the options of the ``bound`` stages (built, or run by this command) and the record of the input
    files they read (files of ``refresh`` stages recorded anew); options and records of other stages are
    dropped: they are free until their stage runs."""
    from retro_pipeline.fingerprints import record_inputs

    stored = wd.stored()
    keys = {k for s in bound for k in every[s].output_keys()}
    free = {o.name for c in all_stages() for o in c.options if o.changes_output} - keys
    values = {k: v for k, v in cfg.stored().items() if k in keys}
    old = stored.get("inputs") or {}
    files = {str(p) for s in bound for p in every[s].input_files()}
    renew = {str(p) for s in refresh for p in every[s].input_files()}
    inputs = {f: old[f] for f in files if f in old and f not in renew}
    inputs.update(record_inputs(f for f in files if f not in inputs))
    wd.store(values, fps, inputs=inputs, drop=free)


def _run_one(wd: Workdir, st: Stage, executor, run: RunOptions, cfg: Config, opened: Opened,
             every: dict[str, Stage], bound: set[str], timeline=None) -> dict:
    """Run one stage; where it fails before it made anything, keep nothing of this run: its files, and its
    options and input records where no built stage holds them."""
    from retro_pipeline.executor.base import run_stage

    had = wd.has_outputs(st.name)
    try:
        return run_stage(st, executor, progress=run.progress, timeline=timeline)
    except BaseException:
        if not had and not wd.has_outputs(st.name):
            try:
                wd.invalidate([st.name], {st.name: st.outputs() + st.final_outputs()})
                unbuilt = {s for s in downstream_of([st.name]) if s in bound and not wd.has_outputs(s)}
                _store(wd, cfg, opened.fingerprints, every, bound - unbuilt, set())
            except Exception:  # never hide the failure itself
                log.debug("could not undo the failed run of %s", st.name, exc_info=True)
        raise


def status(workdir) -> dict[str, dict]:
    """Per stage in pipeline order: its state (done, partial, not started) and, where its outputs were made
    from inputs or settings that changed since, ``stale`` saying which."""
    from retro_pipeline.fingerprints import changed_inputs

    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if not wd.config_path.exists():
        raise RetroError(f"{wd.root}: not a retro-pipeline workdir (no config.json); run "
                         f"'retro-pipeline build --workdir {workdir} ...' first")
    stored = wd.stored()
    cfg, _ = cfgmod.resolve(stored, {})
    out = {c.name: wd.stage_status(c.name) for c in all_stages()}
    changed = dict(changed_inputs(stored.get("inputs") or {}))
    fps, old_fps = fingerprints(cfg), wd.stored_fingerprints()
    why: dict[str, str] = {}
    read_changed = reading(wd, cfg, changed)
    for cls in all_stages():
        if cls.name in read_changed:
            f = read_changed[cls.name]
            why[cls.name] = f"{f} {changed[f]}"
        elif old_fps is not None and old_fps.get(cls.name) not in (None, fps[cls.name]):
            why[cls.name] = "its settings changed"
        else:
            up = [why[n] for n in cls.needs if n in why]
            if up:
                why[cls.name] = up[0]
    for name, st in out.items():
        if name in why and st["state"] != "not started":
            st["stale"] = why[name]
    return out


def load_config(workdir) -> Config:
    """The stored config of a workdir."""
    from retro_pipeline.read import WorkdirReader

    return WorkdirReader(workdir if isinstance(workdir, Workdir) else Workdir(workdir)).config


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return repr(v)
