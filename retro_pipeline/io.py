"""Atomic file writes, completion markers and small HDF5 helpers.

Every output is written as ``name.tmp-<pid>`` beside its target, flushed, fsynced and moved into place with
``os.replace``; a completion marker (counts and size) is written last. A crash therefore never leaves a
file that looks complete, and a stage's start sweeps the stale temporaries a crash left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

from embedder.atomic import atomic_dir, atomic_path, fsync_dir, tmp_path  # noqa: F401  (the one copy)

TMP_RE = re.compile(r"\.tmp-\d+(-\d+)?$")


def write_json(target: str | os.PathLike, obj) -> None:
    """Write ``obj`` as pretty, key-sorted JSON, atomically."""
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def read_json(path: str | os.PathLike, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


KILL_AT_ENV = "RETRO_PIPELINE_KILL_AT"


def failpoint(name: str) -> None:
    """Crash-test aid: with ``RETRO_PIPELINE_KILL_AT=<name>`` set, SIGKILL this process here. The kill tests
    use it where a timed kill cannot land reliably (a one-off job that takes milliseconds on test data);
    names are ``<stage>:finalize`` (before a stage's finalize), ``<stage>:finalized`` (outputs written, done
    marker not yet), ``index-train:trained`` (the index trained, not yet written) and ``index-add:shard-merged``
    (the first shard of --index-shards written, the others not)."""
    if os.environ.get(KILL_AT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


SLOW_AT_ENV = "RETRO_PIPELINE_SLOW_AT"


def slowpoint(name: str) -> None:
    """Lost-node test aid: with ``RETRO_PIPELINE_SLOW_AT=<name>:<seconds>[,...]`` set, first record where this
    runs (a file ``<name>.<node id>.<pid>`` in ``RETRO_PIPELINE_SLOW_DIR``, the Ray node id where there is
    one), then sleep, so that a test can take that node away while the work runs. Names are
    ``<stage>:block`` (every block of a stage) and ``<stage>:finalize``."""
    spec = os.environ.get(SLOW_AT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        at, _, seconds = item.rpartition(":")
        if at == name:
            where = os.environ.get("RETRO_PIPELINE_SLOW_DIR")
            if where:
                node = "local"
                with contextlib.suppress(Exception):
                    import ray

                    if ray.is_initialized():
                        node = ray.get_runtime_context().get_node_id()
                Path(where, f"{name.replace(':', '.')}.{node}.{os.getpid()}").touch()
            time.sleep(float(seconds))


def sweep_temporaries(*dirs: str | os.PathLike) -> int:
    """Remove stale ``*.tmp-<pid>`` files and directories under ``dirs`` (recursively); return how many."""
    import shutil

    n = 0
    for d in dirs:
        d = Path(d)
        if not d.exists():
            continue
        for p in sorted(d.rglob("*.tmp-*"), key=lambda q: len(q.parts)):
            if not TMP_RE.search(p.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                n += 1
    return n


def h5_create(f, name: str, data=None, shape=None, dtype=None):
    """Create an HDF5 dataset with settings that keep files byte-identical across runs (no timestamps)."""
    return f.create_dataset(name, data=data, shape=shape, dtype=dtype, track_times=False)


def h5_open_write(path: str | os.PathLike):
    """Open a new HDF5 file for writing with a fixed layout so equal content gives equal bytes."""
    import h5py

    return h5py.File(path, "w", libver=("earliest", "v110"), track_order=False)
