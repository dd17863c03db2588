"""A build's working directory: every path and marker name, the stored config, the run lock and stage status.

Layout (Megatron's where a format exists, see docs/formats.md)::

    W/config.json                         output-changing options, stage fingerprints, input records
    W/db/individual/<prefix>/<s>-<e>.hdf5 db-build blocks
    W/db/merged/{train,sampled,valid}.hdf5
    W/db/indexed_dataset_infos.json
    W/embed/<db>/<s>-<e>.hdf5             embedding blocks (dataset ``data``)
    W/index/index.json                    the index string chosen (``auto`` resolved), its dimension
    W/index/faiss-par-add/<index_str>/    empty_1.000.faissindex, queries.hdf5, add_codes/ and add_truth/
                                          blocks, added_1.000_1.000.faissindex (+ .ivfdata/ on disk)
                                          or shards/ + shards.json (--index-shards), search.json
    W/<stage>/                            the outputs of a stage without a Megatron format
    W/markers/<stage>/...                 block completion markers, the plan and the done marker
    W/logs/<time>-<pid>.log               one log per command
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

from retro_pipeline.errors import RetroError
from retro_pipeline.io import read_json, write_json

FINGERPRINT_VERSION = 2  # how config.json's stage fingerprints are computed (retro_pipeline.stage.fingerprint)
INDEX_TYPE = "faiss-par-add"  # Megatron's name for an index built by parallel adds


class Workdir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self._stored: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"

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
    def train_documents_path(self) -> Path:
        """query-neighbors' int64 [n_chunks_train] .npy: the global document number of each train-DB row (read
        memory-mapped by its workers to drop neighbors from a sample's own documents)."""
        return self.root / "query" / "train_documents.npy"

    @property
    def infos_path(self) -> Path:
        return self.db_dir / "indexed_dataset_infos.json"

    def embed_dir(self, db: str) -> Path:
        return self.root / "embed" / db

    @property
    def index_root(self) -> Path:
        return self.root / "index"

    @property
    def index_info_path(self) -> Path:
        return self.index_root / "index.json"

    def index_dir(self, index_str: str) -> Path:
        return self.index_root / INDEX_TYPE / index_str

    def empty_index_path(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "empty_1.000.faissindex"

    def added_index_path(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "added_1.000_1.000.faissindex"

    def added_lists_dir(self, index_str: str) -> Path:
        """The on-disk inverted lists of an added index larger than --index-memory (``lists.ivfdata``)."""
        return self.index_dir(index_str) / "added_1.000_1.000.ivfdata"

    def shards_path(self, index_str: str) -> Path:
        """``shards.json`` of an index cut into shards (--index-shards): the shard files and their row ranges."""
        return self.index_dir(index_str) / "shards.json"

    def shards_dir(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "shards"

    def shard_path(self, index_str: str, i: int, n: int) -> Path:
        return self.shards_dir(index_str) / f"added-{i:03d}-of-{n:03d}.faissindex"

    def queries_path(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "queries.hdf5"

    def add_codes_dir(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "add_codes"

    def add_truth_dir(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "add_truth"

    def search_params_path(self, index_str: str) -> Path:
        return self.index_dir(index_str) / "search.json"

    def stage_dir(self, stage: str) -> Path:
        """Outputs of a stage that has no Megatron format of its own."""
        return self.root / stage

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def markers_dir(self, stage: str) -> Path:
        return self.root / "markers" / stage

    def done_marker(self, stage: str) -> Path:
        return self.markers_dir(stage) / "_done.json"

    def plan_marker(self, stage: str) -> Path:
        return self.markers_dir(stage) / "_plan.json"

    def block_marker(self, stage: str, block_name: str) -> Path:
        return self.markers_dir(stage) / (block_name.replace("/", "__") + ".json")

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

    def stored_fingerprints(self) -> dict[str, str] | None:
        """The stage fingerprints config.json holds, or None where they were computed another way."""
        stored = self.stored()
        if stored.get("fingerprint_version") != FINGERPRINT_VERSION:
            return None
        return dict(stored.get("fingerprints") or {})

    def store(self, values: dict[str, Any], fingerprints: dict[str, str], inputs: dict | None = None,
              drop=()) -> None:
        """Write the output-changing option ``values``, the stage ``fingerprints`` and, when given, a new record
        of the input files (see :mod:`retro_pipeline.fingerprints`); the keys ``drop`` are removed, other keys
        already there are kept."""
        stored = {k: v for k, v in self.stored().items() if k not in set(drop)}
        if inputs is not None:
            stored["inputs"] = inputs
        self._stored = {**stored, **values, "fingerprints": fingerprints, "fingerprint_version": FINGERPRINT_VERSION}
        write_json(self.config_path, self._stored)

    def store_extra(self, values: dict[str, Any]) -> None:
        """Add keys a stage records for its readers (e.g. ``retro_neighbor_dirs``) to config.json."""
        self._stored = {**self.stored(), **values}
        write_json(self.config_path, self._stored)

    def invalidate(self, stages, outputs: dict[str, list[Path]]) -> None:
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
    def block_markers(self, stage: str) -> list[Path]:
        d = self.markers_dir(stage)
        return sorted(p for p in d.glob("*.json") if not p.name.startswith("_")) if d.exists() else []

    def has_outputs(self, stage: str) -> bool:
        """Whether ``stage`` made anything (a finished block or its done marker): from then on its options are
        those of its outputs; before, they are free."""
        return self.done_marker(stage).exists() or bool(self.block_markers(stage))

    def missing_files(self, stage: str, plan: list[str] | None = None) -> list[str]:
        """Files a stage's markers record (each finished block's files at their recorded size, the done
        marker's final outputs) that are gone or have another size now."""
        missing = []
        for m in self.block_markers(stage):
            rec = read_json(m) or {}
            sizes = rec.get("bytes")
            if isinstance(sizes, int) and len(rec.get("paths", [])) == 1:
                sizes = {rec["paths"][0]: sizes}
            for path, size in (sizes or {}).items() if isinstance(sizes, dict) else ():
                if _size(path) != size:
                    missing.append(path)
        done = read_json(self.done_marker(stage)) or {}
        for path, size in (done.get("outputs") or {}).items():
            if _size(path) is None or (size is not None and _size(path) != size):
                missing.append(path)
        return missing

    def stage_status(self, stage: str) -> dict[str, Any]:
        """done (the done marker, and every file the markers record at its size), partial (blocks done of
        total; ``missing``: recorded files that are gone) or not started."""
        done = read_json(self.done_marker(stage))
        plan = read_json(self.plan_marker(stage))
        names = set((plan or {}).get("blocks", []))
        missing = self.missing_files(stage) if done is not None or plan is not None else []
        if done is not None and not missing:
            return {"state": "done", **done}
        if done is None and plan is None:
            return {"state": "not started"}
        gone = set(missing)
        n_done = 0
        for m in self.block_markers(stage):
            name = m.stem.replace("__", "/")
            if name in names or not names:
                rec = read_json(m) or {}
                if not gone & set(rec.get("paths") or ()):
                    n_done += 1
        total = len(names) if names else (done or {}).get("blocks", n_done)
        out = {"state": "partial", "blocks_done": min(n_done, total), "blocks_total": total}
        if missing:
            out["missing"] = missing
        return out


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path) if not os.path.isdir(path) else -1
    except OSError:
        return None
