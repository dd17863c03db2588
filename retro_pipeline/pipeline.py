"""The Python API behind the CLI: resolve a workdir's config, then run stages in order on an executor."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from retro_pipeline.config import RunOptions
from retro_pipeline.errors import RetroError
from retro_pipeline.workdir import Workdir

log = logging.getLogger(__name__)

STAGE_ORDER = ("db-build", "embed-sampled")


def make_stage(name: str, workdir: Workdir, cfg, run: RunOptions):
    if name == "db-build":
        from retro_pipeline.stages.db import DBBuildStage

        return DBBuildStage(str(workdir.root), cfg)
    if name == "embed-sampled":
        from retro_pipeline.stages.embed import EmbedStage

        return EmbedStage(str(workdir.root), cfg, db="sampled", device=run.device, dtype=run.dtype,
                          batch_size=run.batch_size)
    raise RetroError(f"unknown stage {name!r}; choose from {', '.join(STAGE_ORDER)}")


def make_executor(run: RunOptions):
    if run.executor == "local":
        from retro_pipeline.executor.base import LocalExecutor

        return LocalExecutor()
    if run.executor == "ray":
        from retro_pipeline.executor.ray import RayExecutor

        return RayExecutor(address=run.address, num_workers=run.num_workers, cpus_per_worker=run.cpus_per_worker,
                           gpus_per_worker=run.gpus_per_worker)
    raise RetroError(f"--executor {run.executor!r}: choose ray or local")


def absolute_paths(given: dict[str, Any]) -> dict[str, Any]:
    """Paths in options made absolute against the current directory, so that the CLI and the Python API
    store the same values and a workdir works from anywhere later."""
    given = dict(given)
    if given.get("data_path"):
        from retro_pipeline.corpus import blend_to_list, parse_blend

        given["data_path"] = blend_to_list([(w, _abs(p)) for w, p in parse_blend(given["data_path"])])
    for key in ("gpt_tokenizer", "embedder"):
        if given.get(key) and os.path.exists(os.path.expanduser(str(given[key]))):
            given[key] = _abs(given[key])
    return given


def _abs(p) -> str:
    return os.path.abspath(os.path.expanduser(str(p)))


def run_stages(workdir: str, stages: list[str], given: dict[str, Any] | None = None,
               run: RunOptions | None = None, force: bool = False) -> dict[str, dict]:
    """Run ``stages`` (in pipeline order) for ``workdir`` with config options ``given``.

    The first run stores the output-changing options and a record of every input file in ``config.json``
    once the inputs have been checked; a later run that contradicts the options stops (or, with ``force``,
    rebuilds the stages they affect), and one whose input files changed stops naming the file.
    A first run that fails before anything was stored leaves no workdir behind.
    """
    wd = Workdir(workdir)
    created = not wd.root.exists()
    try:
        return _run_stages(wd, stages, absolute_paths({k: v for k, v in (given or {}).items() if v is not None}),
                           run or RunOptions(), force)
    except BaseException:
        if created and not wd.config_path.exists():
            shutil.rmtree(wd.root, ignore_errors=True)
        raise


def _run_stages(wd: Workdir, stages, given, run: RunOptions, force: bool) -> dict[str, dict]:
    from retro_pipeline.executor.base import run_stage
    from retro_pipeline.fingerprints import check_inputs
    from retro_pipeline.logs import attach_workdir_log

    stages = [s for s in STAGE_ORDER if s in stages]
    with wd.lock():
        cfg, rebuild = wd.resolve(given, force=force)
        stored_inputs = wd.stored().get("inputs") or {}
        if force and stored_inputs:
            from retro_pipeline.fingerprints import changed_inputs

            if changed_inputs(stored_inputs):
                rebuild = list(STAGE_ORDER)
        elif stored_inputs:
            check_inputs(stored_inputs, wd.root)
        objs = [make_stage(s, wd, cfg, run) for s in stages]
        if rebuild:
            every = {s: make_stage(s, wd, cfg, run) for s in STAGE_ORDER}
            log.info("--force: rebuilding %s", ", ".join(rebuild))
            wd.invalidate(rebuild, {s: every[s].output_dirs() + every[s].final_outputs() for s in rebuild})
        if objs:
            objs[0].check()  # check the inputs before the config is stored
        wd.store(cfg, inputs=rebuild or not stored_inputs)
        attach_workdir_log(wd.root)
        executor = make_executor(run)
        out = {}
        for st in objs:
            out[st.name] = run_stage(st, wd.markers_dir(st.name), executor, progress=run.progress)
        return out


def status(workdir: str) -> dict[str, dict]:
    wd = Workdir(workdir)
    if not wd.config_path.exists():
        raise RetroError(f"{wd.root}: not a retro-pipeline workdir (no config.json); run "
                         f"'retro-pipeline build --workdir {workdir} ...' first")
    from retro_pipeline.fingerprints import changed_inputs

    out = {s: wd.stage_status(s) for s in STAGE_ORDER}
    changed = changed_inputs(wd.stored().get("inputs") or {})
    if changed:  # every stage was built from the old inputs
        for st in out.values():
            if st["state"] != "not started":
                st["stale"] = f"{changed[0][0]} {changed[0][1]}"
    return out


def load_config(workdir: str):
    """The stored config of a workdir."""
    from retro_pipeline import config as cfgmod

    wd = Workdir(workdir)
    stored = wd.stored()
    if not stored:
        raise RetroError(f"{wd.root}: not a retro-pipeline workdir (no config.json)")
    return cfgmod.validate(cfgmod.from_dict(stored))
