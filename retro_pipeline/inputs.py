"""Raw-text inputs: the documents of JSONL, Parquet and text files and of directories of them, in a fixed order.

A file named as an input is read whatever its name: ``.jsonl``/``.json``/``.ndjson`` (optionally ``.gz``) as
JSONL (one JSON object per line, the text under ``text_key``), ``.parquet``/``.pq`` as Parquet (the column
``text_key``), anything else as one UTF-8 text document. A directory is walked recursively in sorted order,
hidden entries skipped, and only files of known kinds are read: JSONL and Parquet as above and text files
(``.txt``, ``.text``, ``.md``, ``.rst`` or no suffix); other files are skipped with one warning.

:class:`Inputs` also tells how many bytes of the input have been consumed (``position`` of ``total_bytes``), so
that a progress bar can have a total: plain files count their bytes, ``.gz`` files their compressed position,
Parquet files their size apportioned per row.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

from retro_pipeline.errors import RetroError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")  # and files without a suffix
_SHOW = 3  # names shown in the warning about skipped files
_KNOWN = ("JSONL (.jsonl, .json, .ndjson, optionally .gz), Parquet (.parquet, .pq) and text (.txt, .text, .md, "
          ".rst, no suffix)")


def _ignore(_: int) -> None:
    pass


def _kind(path: Path, in_directory: bool = False) -> str | None:
    """'jsonl', 'parquet' or 'text'; inside a directory None for a file of no known kind."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if not in_directory or not path.suffix or path.suffix.lower() in TEXT_SUFFIXES:
        return "text"
    return None


def _files(path: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The (file, kind) pairs to read for one input path, and the files of a directory skipped for their kind."""
    if not path.is_dir():
        return [(path, _kind(path))], []
    keep, skipped = [], []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        kind = _kind(p, in_directory=True)
        if kind is None:
            skipped.append(p)
        else:
            keep.append((p, kind))
    return keep, skipped


def _lines(path: Path, at: Callable[[int], None]) -> Iterator[bytes]:
    """Lines of a (possibly gzipped) file, calling ``at`` with the bytes of the file consumed so far."""
    with open(path, "rb") as raw:
        if not path.name.lower().endswith(".gz"):
            pos = 0
            for line in raw:
                pos += len(line)
                at(pos)
                yield line
            return
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                for line in f:
                    at(raw.tell())
                    yield line
        except (OSError, EOFError, zlib.error) as e:
            raise RetroError(f"{path}: not a readable gzip file ({e}); pass an intact .gz file, or rename it "
                             f"if it is not compressed") from None


def _iter_jsonl(path: Path, text_key: str, at: Callable[[int], None] = _ignore) -> Iterator[str]:
    for lineno, line in enumerate(_lines(path, at), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise RetroError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)}); each line must be "
                             f"one JSON object such as {{\"{text_key}\": \"...\"}}") from None
        if not isinstance(obj, dict) or text_key not in obj:
            keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
            raise RetroError(f"{path}:{lineno}: no '{text_key}' key (found: {keys}); pass --text-key with "
                             f"the key that holds the document text")
        text = obj[text_key]
        if not isinstance(text, str):
            raise RetroError(f"{path}:{lineno}: '{text_key}' is {type(text).__name__}, not a string; "
                             f"pass --text-key with the key that holds the document text")
        yield text


def _iter_parquet(path: Path, text_key: str, at: Callable[[int], None] = _ignore) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise RetroError(f"{path}: cannot read it as Parquet ({e}); pass a valid .parquet file") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise RetroError(f"{path}: no '{text_key}' column (columns: {', '.join(names[:8])}); pass --text-key "
                         f"with the column that holds the document text")
    size, n_rows = path.stat().st_size, max(pf.metadata.num_rows, 1)
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        values = batch.column(0).to_pylist()
        for i, text in enumerate(values):
            if not isinstance(text, str):
                raise RetroError(f"{path}: row {row + i} of column '{text_key}' is "
                                 f"{'null' if text is None else type(text).__name__}, not text; clean the file "
                                 f"or pass --text-key with a string column")
        for text in values:
            row += 1
            at(size * row // n_rows)
            yield text


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RetroError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or remove it from "
                         f"the input") from None


def _not_found(p) -> RetroError:
    return RetroError(f"{p}: input not found; pass existing JSONL, Parquet or text files or directories")


class Inputs:
    """The documents of several input paths in the order given; iterate to read them (once).

    Creating it checks that every path exists and lists the files (warning once about the files of
    directories that are skipped for their kind). While iterating, ``position`` is the number of input bytes
    consumed up to and including the last document yielded, out of ``total_bytes``; it ends at
    ``total_bytes`` when the files did not change meanwhile.
    """

    def __init__(self, inputs, text_key: str = "text"):
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        self.paths = [Path(p) for p in inputs]
        for p in self.paths:  # fail before reading anything
            if not p.exists():
                raise _not_found(p)
        self.text_key = text_key
        self.files: list[tuple[Path, str, int]] = []
        self.skipped: list[Path] = []
        for p in self.paths:
            keep, skipped = _files(p)
            self.files += [(f, kind, f.stat().st_size) for f, kind in keep]
            self.skipped += skipped
        if self.skipped:
            shown = ", ".join(str(p) for p in self.skipped[:_SHOW]) + (", ..." if len(self.skipped) > _SHOW else "")
            log.warning("skipped %d file%s of unknown kind in input directories (%s); only %s files are read "
                        "from a directory; name a file as an input to read it as text", len(self.skipped),
                        "" if len(self.skipped) == 1 else "s", shown, _KNOWN)
        self.total_bytes = sum(size for _, _, size in self.files)
        self.position = 0

    def __iter__(self) -> Iterator[str]:
        base = 0
        text_key = self.text_key
        for f, kind, size in self.files:
            def at(n: int, base: int = base) -> None:
                self.position = base + n

            if kind == "jsonl":
                yield from _iter_jsonl(f, text_key, at)
            elif kind == "parquet":
                yield from _iter_parquet(f, text_key, at)
            else:
                text = _read_text(f)
                at(size)
                yield text
            base += size
            self.position = base


def iter_documents(path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one input path (file or directory) in a fixed order."""
    yield from Inputs([path], text_key)


def iter_inputs(inputs, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of several input paths, in the order given."""
    yield from Inputs(inputs, text_key)
