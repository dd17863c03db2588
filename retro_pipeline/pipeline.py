"""The Python API behind the CLI: open a workdir (config, fingerprints, inputs), then run stages in order.

Everything here comes from the stages' declarations (:mod:`retro_pipeline.stage`): the order, the options,
which stages an option or an input file affects, and what each stage needs first.
"""

from __future__ import annotations

import logging
import shutil
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
    record_inputs: bool


def open_workdir(wd: Workdir, given: dict[str, Any], force: bool = False) -> Opened:
    """Resolve the config of ``wd`` with ``given`` options and check it against what the workdir holds.

    Without ``force``, options that contradict the stored ones, a stage built with other settings, and an
    input file that changed since it was recorded are one-line errors. With ``force`` they name the stages
    to rebuild: the stages the option or file belongs to, and every stage downstream of them.
    """
    from retro_pipeline.fingerprints import changed_inputs, check_inputs

    stored = wd.stored()
    cfg, conflicts = cfgmod.resolve(stored, given)
    if conflicts and not force:
        old, _ = cfgmod.resolve(stored, {})
        detail = "; ".join(f"{k}: stored {_show(old[k])}, given {_show(cfg[k])}" for k in conflicts)
        raise RetroError(f"{wd.config_path}: this workdir was built with other settings ({detail}); use a new "
                         f"--workdir, or pass --force to rebuild the stages they affect")
    fps = fingerprints(cfg)
    started = [c.name for c in all_stages() if wd.stage_status(c.name)["state"] != "not started"]
    old_fps = wd.stored_fingerprints()
    changed_fp = [s for s in started if old_fps is not None and old_fps.get(s) not in (None, fps[s])]
    changed = changed_inputs(stored.get("inputs") or {})
    if not force:
        check_inputs(changed, wd.root)
    if changed_fp and not force:
        first = changed_fp[0]
        raise RetroError(f"{wd.config_path}: stage {first} was built with other settings than this workdir's "
                         f"config now gives (the config was edited, or an upstream stage changed); pass --force to "
                         f"rebuild it, or use a new --workdir")
    rebuild = []
    if force:
        roots = {s for k in conflicts for s in owners(k)} | set(changed_fp) | set(reading(wd, cfg, dict(changed)))
        rebuild = [s for s in stage_order() if s in downstream_of(roots)]
    return Opened(wd, cfg, fps, rebuild, record_inputs=bool(rebuild) or "inputs" not in stored)


def run_stages(workdir, stages: list[str], given: dict[str, Any] | None = None,
               run: RunOptions | None = None, force: bool = False) -> dict[str, dict]:
    """Run ``stages`` (in pipeline order) for ``workdir`` with options ``given`` (any declared option).

    The first run stores the output-changing options and a record of every input file in ``config.json``
    once the inputs have been checked; a later run that contradicts the options stops (or, with ``force``,
    rebuilds the stages they affect and those downstream), and one whose input files changed stops naming
    the file. A first run that fails before anything was stored leaves no workdir behind.
    """
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    created = not wd.root.exists()
    try:
        return _run_stages(wd, stages, {k: v for k, v in (given or {}).items() if v is not None},
                           run or RunOptions(), force)
    except BaseException:
        if created and not wd.config_path.exists():
            shutil.rmtree(wd.root, ignore_errors=True)
        raise


def _run_stages(wd: Workdir, stages, given, run: RunOptions, force: bool) -> dict[str, dict]:
    from retro_pipeline.executor.base import run_stage
    from retro_pipeline.fingerprints import record_inputs
    from retro_pipeline.logs import attach_workdir_log

    unknown = [s for s in stages if s not in stage_order()]
    if unknown:
        raise RetroError(f"unknown stage {unknown[0]!r}; choose from {', '.join(stage_order())}")
    with wd.lock():
        opened = open_workdir(wd, given, force)
        cfg = opened.cfg
        classes = [c for c in all_stages() if c.name in stages]
        every = {c.name: make_stage(c, wd, cfg, run) for c in all_stages()}
        running = {c.name for c in classes}
        for cls in classes:
            for need in cls.needs:
                if need not in running and (wd.stage_status(need)["state"] != "done" or need in opened.rebuild):
                    raise RetroError(f"{cls.name} needs {need}, which is not done in {wd.root}; run "
                                     f"'retro-pipeline {need} --workdir {wd.root}' (or build) first")
        objs = [every[c.name] for c in classes]
        for st in objs:
            st.validate()
        if opened.rebuild:
            log.info("--force: rebuilding %s", ", ".join(opened.rebuild))
            wd.invalidate(opened.rebuild, {s: every[s].outputs() + every[s].final_outputs() for s in opened.rebuild})
        if objs:
            objs[0].check()  # check the inputs before the config is stored
        executor = make_executor(run)
        if any(wd.stage_status(st.name)["state"] != "done" for st in objs):
            executor.connect()  # an unreachable cluster is an error before anything is written
        inputs = None
        if opened.record_inputs:
            inputs = record_inputs(p for st in every.values() for p in st.input_files())
        wd.store(cfg.stored(), opened.fingerprints, inputs=inputs)
        attach_workdir_log(wd.root)
        out = {}
        for st in objs:
            out[st.name] = run_stage(st, executor, progress=run.progress)
        return out


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
