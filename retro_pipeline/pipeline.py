"""The Python API behind the CLI: resolve a workdir's config, then run stages in order on an executor."""

from __future__ import annotations

import sys
from typing import Any

from retro_pipeline.config import RunOptions
from retro_pipeline.errors import RetroError
from retro_pipeline.workdir import Workdir

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

        return LocalExecutor(max_retries=run.max_retries)
    if run.executor == "ray":
        from retro_pipeline.executor.ray import RayExecutor

        return RayExecutor(address=run.address, num_workers=run.num_workers, cpus_per_worker=run.cpus_per_worker,
                           gpus_per_worker=run.gpus_per_worker, max_retries=run.max_retries)
    raise RetroError(f"--executor {run.executor!r}: choose ray or local")


def run_stages(workdir: str, stages: list[str], given: dict[str, Any] | None = None,
               run: RunOptions | None = None, force: bool = False) -> dict[str, dict]:
    """Run ``stages`` (in pipeline order) for ``workdir`` with config options ``given``.

    The first run stores the output-changing options in ``config.json`` once the inputs have been checked;
    a later run that contradicts them stops (or, with ``force``, rebuilds the stages they affect).
    """
    from retro_pipeline.executor.base import run_stage

    run = run or RunOptions()
    wd = Workdir(workdir)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    stages = [s for s in STAGE_ORDER if s in stages]
    with wd.lock():
        cfg, rebuild = wd.resolve(given, force=force)
        objs = [make_stage(s, wd, cfg, run) for s in stages]
        if rebuild:
            every = {s: make_stage(s, wd, cfg, run) for s in STAGE_ORDER}
            print(f"--force: rebuilding {', '.join(rebuild)}", file=sys.stderr)
            wd.invalidate(rebuild, {s: every[s].output_dirs() + every[s].final_outputs() for s in rebuild})
        if objs:
            objs[0].check()  # check the inputs before the config is stored
        wd.store(cfg)
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
    return {s: wd.stage_status(s) for s in STAGE_ORDER}


def load_config(workdir: str):
    """The stored config of a workdir."""
    from retro_pipeline import config as cfgmod

    wd = Workdir(workdir)
    stored = wd.stored()
    if not stored:
        raise RetroError(f"{wd.root}: not a retro-pipeline workdir (no config.json)")
    return cfgmod.validate(cfgmod.from_dict(stored))
