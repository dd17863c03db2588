"""A build's working directory: paths, the stored config and its guard, the run lock and stage status.

Layout (Megatron's where a format exists, see docs/formats.md)::

    W/config.json                         output-changing settings of this build
    W/db/individual/<prefix>/<s>-<e>.hdf5 db-build blocks
    W/db/merged/{train,sampled,valid}.hdf5
    W/db/indexed_dataset_infos.json
    W/embed/<db>/<s>-<e>.hdf5             embedding blocks (dataset ``data``)
    W/markers/<stage>/...                 block completion markers, the plan and the done marker
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

from retro_pipeline import config as cfgmod
from retro_pipeline.errors import RetroError
from retro_pipeline.io import read_json, write_json


class Workdir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self._stored: dict[str, Any] | None = None

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    def individual_db_dir(self, prefix: str) -> Path:
        # Megatron keys individual DBs by the prefix's base name.
        return self.db_dir / "individual" / Path(prefix).name

    def merged_db_path(self, name: str) -> Path:
        return self.db_dir / "merged" / f"{name}.hdf5"

    @property
    def infos_path(self) -> Path:
        return self.db_dir / "indexed_dataset_infos.json"

    def embed_dir(self, db: str) -> Path:
        return self.root / "embed" / db

    def markers_dir(self, stage: str) -> Path:
        return self.root / "markers" / stage

    def done_marker(self, stage: str) -> Path:
        return self.markers_dir(stage) / "_done.json"

    def plan_marker(self, stage: str) -> Path:
        return self.markers_dir(stage) / "_plan.json"

    # ---- config
    def stored(self) -> dict[str, Any]:
        """The content of config.json ({} before the first run), read once per Workdir object."""
        if self._stored is None:
            try:
                d = read_json(self.config_path, default={})
            except ValueError as e:
                raise RetroError(f"{self.config_path}: not valid JSON ({e}); restore it or use a new "
                                 f"--workdir") from None
            if not isinstance(d, dict):
                raise RetroError(f"{self.config_path}: not a JSON object; restore it or use a new --workdir")
            self._stored = d
        return dict(self._stored)

    def resolve(self, given: dict[str, Any], force: bool = False) -> tuple[cfgmod.BuildConfig, list[str]]:
        """Merge ``given`` options over the stored config over defaults.

        Returns the config and the stages whose outputs must be rebuilt (only with ``force``). Options that
        contradict the stored ones stop the run unless ``force`` is set.
        """
        stored = self.stored()
        stored_cfg = cfgmod.validate(cfgmod.from_dict(stored)) if stored else None
        merged = cfgmod.from_dict({**(stored_cfg.to_dict() if stored_cfg else {}), **given})
        merged = cfgmod.validate(merged)
        conflicts = []
        if stored_cfg is not None:
            new, old = merged.to_dict(), stored_cfg.to_dict()
            conflicts = [k for k in given if k in old and k in new and new[k] != old[k]]
        if conflicts and not force:
            old = stored_cfg.to_dict()
            detail = "; ".join(f"{k}: stored {_show(old[k])}, given {_show(merged.to_dict()[k])}" for k in conflicts)
            raise RetroError(
                f"{self.config_path}: this workdir was built with other settings ({detail}); "
                f"use a new --workdir, or pass --force to rebuild the stages they affect"
            )
        return merged, cfgmod.affected_stages(conflicts)

    def store(self, cfg: cfgmod.BuildConfig, inputs: bool = False) -> None:
        """Write the config, with each stage's fingerprint (a hash of the settings its outputs depend on) and,
        with ``inputs``, a new record of the input files (see :mod:`retro_pipeline.fingerprints`)."""
        fps = {s: cfg.fingerprint(keys) for s, keys in cfgmod.STAGE_KEYS.items()}
        stored = self.stored()
        if inputs or "inputs" not in stored:
            from retro_pipeline.fingerprints import record_inputs

            stored["inputs"] = record_inputs(cfg)
        self._stored = {**stored, **cfg.to_dict(), "fingerprints": fps}
        write_json(self.config_path, self._stored)

    def invalidate(self, stages: list[str], outputs: dict[str, list[Path]]) -> None:
        """Delete the markers and outputs of ``stages`` (used by --force)."""
        for s in stages:
            for p in outputs.get(s, []):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            shutil.rmtree(self.markers_dir(s), ignore_errors=True)

    # ---- lock
    @contextlib.contextmanager
    def lock(self):
        """Hold an exclusive lock so that two builds never write one workdir at once."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise RetroError(f"{self.root}: cannot create or write the workdir ({e.strerror}); pass a --workdir "
                             f"in a directory you can write to") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RetroError(f"{self.root}: another retro-pipeline run holds this workdir; "
                                 f"wait for it to finish or stop it") from None
            yield
        finally:
            os.close(fd)

    # ---- status
    def stage_status(self, stage: str) -> dict[str, Any]:
        done = read_json(self.done_marker(stage))
        if done is not None:
            return {"state": "done", **done}
        plan = read_json(self.plan_marker(stage))
        if plan is None:
            return {"state": "not started"}
        names = set(plan.get("blocks", []))
        n_done = sum(1 for p in self.markers_dir(stage).glob("*.json")
                     if not p.name.startswith("_") and p.stem.replace("__", "/") in names)
        return {"state": "partial", "blocks_done": n_done, "blocks_total": len(names)}


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return repr(v)
