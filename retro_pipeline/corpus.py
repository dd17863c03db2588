"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) and corpus blends.

The format (docs/formats.md §1): ``.bin`` holds the tokens of all sequences back to back; ``.idx`` is a header
(magic, version, dtype code, N, D) followed by ``int32[N]`` lengths, ``int64[N]`` byte pointers into ``.bin``
and ``int64[D]`` document indices. For RETRO one sequence is one document.

:class:`IndexedDataset` memory-maps both files and checks every invariant on open; :class:`IndexedDatasetWriter`
streams tokens to disk and moves both files into place atomically (``.bin`` first, ``.idx`` last).
"""

from __future__ import annotations

import array
import contextlib
import os
import struct
from pathlib import Path

import numpy as np

from retro_pipeline import arrays
from retro_pipeline.errors import RetroError
from retro_pipeline.io import fsync_dir, tmp_path

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"TNTIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D -> 34 bytes

DTYPES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(v): k for k, v in DTYPES.items()}

_BLOCK = 1 << 22  # elements per step when scanning big arrays with bounded memory
_FIX = "re-run `retro-pipeline preprocess` to rewrite it"


def best_dtype(vocab_size: int) -> type:
    """Token dtype Megatron writers use: uint16 below 65,500 vocabulary entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _strip_suffix(prefix: str | os.PathLike) -> str:
    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and not Path(prefix + ".idx").exists():
            return prefix[: -len(suffix)]
    return prefix


class IndexedDataset:
    """Read-only view of a Megatron indexed dataset; ``len()`` is the number of sequences (= documents)."""

    def __init__(self, prefix: str | os.PathLike, validate: bool = True):
        self.prefix = _strip_suffix(prefix)
        self.idx_path, self.bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise RetroError(f"{p}: file not found; pass the corpus prefix (the path without .bin/.idx) "
                                 f"of an existing PREFIX.bin + PREFIX.idx pair, or create it with "
                                 f"`retro-pipeline preprocess`")
        self._open_index()
        self._open_bin()
        if validate:
            self._validate()
        self._offsets = None

    # -- opening -------------------------------------------------------------------------------------
    def _bad(self, path: str, problem: str) -> RetroError:
        return RetroError(f"{path}: {problem}; {_FIX}")

    def _open_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if head.startswith(LEGACY_MAGIC):
            raise RetroError(f"{path}: this is the legacy non-mmap indexed dataset format (magic TNTIDX), "
                             f"which is not supported; re-run preprocessing (Megatron's preprocess_data.py or "
                             f"`retro-pipeline preprocess`) to write the mmap format (magic MMIDIDX)")
        if not head.startswith(MAGIC):
            raise self._bad(path, f"not a Megatron indexed dataset index (magic {head[:9]!r}, "
                                  f"expected {MAGIC!r})")
        if len(head) < HEADER.size:
            raise self._bad(path, f"truncated header ({size} bytes, need {HEADER.size})")
        _, version, code, n, d = HEADER.unpack(head)
        if version != VERSION:
            raise self._bad(path, f"unsupported index version {version} (only version {VERSION} exists)")
        if code not in DTYPES:
            raise self._bad(path, f"unknown dtype code {code} (known: {sorted(DTYPES)})")
        need = HEADER.size + n * 4 + n * 8 + d * 8
        if size not in (need, need + n):  # + n: optional int8 sequence modes of multimodal corpora
            what = "truncated" if size < need else "has unexpected trailing bytes"
            raise self._bad(path, f"{what}: {size} bytes, but the header (N={n} sequences, D={d} "
                                  f"document indices) needs {need}")
        self.dtype = np.dtype(DTYPES[code])
        self._idx_map = np.memmap(path, mode="r", dtype=np.uint8)
        buf, off = self._idx_map, HEADER.size
        self.sequence_lengths = np.frombuffer(buf, np.int32, n, off)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n, off + 4 * n)
        self.document_indices = np.frombuffer(buf, np.int64, d, off + 12 * n)
        if code == 7 and n:  # old writers used code 7 for float64 too: the .bin size tells which
            total = int(self.sequence_lengths.sum(dtype=np.int64))
            if total and os.path.getsize(self.bin_path) == 8 * total:
                self.dtype = np.dtype(np.float64)
        self._n = n

    def _open_bin(self) -> None:
        size = os.path.getsize(self.bin_path)
        if size == 0:
            self._bin_map = None
            self.tokens = np.empty(0, dtype=self.dtype)
        else:
            self._bin_map = np.memmap(self.bin_path, mode="r", dtype=np.uint8)
            self.tokens = np.frombuffer(self._bin_map, self.dtype, size // self.dtype.itemsize)
        self._bin_size = size

    def _validate(self) -> None:
        n, item, lengths, pointers = self._n, self.dtype.itemsize, self.sequence_lengths, self.sequence_pointers
        di = self.document_indices
        if len(di) == 0 or di[0] != 0 or di[-1] != n:
            got = "empty" if len(di) == 0 else f"starts at {di[0]} and ends at {di[-1]}"
            raise self._bad(self.idx_path, f"bad document_indices: {got}, must start at 0 and end at N={n}")
        if len(di) > 1 and (np.diff(di) < 0).any():
            raise self._bad(self.idx_path, "bad document_indices: not non-decreasing")
        start = 0
        for i in range(0, n, _BLOCK):  # bounded memory: pointers == starts of the lengths * itemsize
            ln = lengths[i:i + _BLOCK].astype(np.int64)
            if (ln < 0).any():
                raise self._bad(self.idx_path, f"negative sequence length near sequence {i}")
            bounds = start + arrays.offsets(ln) * item
            expect = bounds[:-1]
            bad = np.flatnonzero(expect != pointers[i:i + _BLOCK])
            if len(bad):
                j = i + int(bad[0])
                raise self._bad(self.idx_path, f"sequence pointers do not match the lengths (sequence {j}: "
                                               f"pointer {pointers[j]}, expected {expect[bad[0]]})")
            start = int(bounds[-1])
        if self._bin_size != start:
            raise self._bad(self.bin_path, f"size is {self._bin_size} bytes but {self.idx_path} describes "
                                           f"{start} bytes ({self.num_tokens} tokens of {self.dtype}); the "
                                           f"file is truncated or belongs to another index")

    def __reduce__(self):  # pickles (e.g. to Ray workers) as a reopen, never as the mapped data
        return (IndexedDataset, (self.prefix, False))

    # -- access --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def sequence_offsets(self) -> np.ndarray:
        """int64[N+1] token offsets into :attr:`tokens`: sequence i is ``tokens[off[i]:off[i+1]]``."""
        if self._offsets is None:
            off = np.empty(self._n + 1, dtype=np.int64)
            off[:-1] = self.sequence_pointers // self.dtype.itemsize
            off[-1] = self.tokens.size if self._n else 0
            self._offsets = off
        return self._offsets

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence ``i`` (to its end when length is None), as a view."""
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {n} sequences")
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of length {size}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start:start + length]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self._n))]
        return self.get(int(i))

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={self._n}, dtype={self.dtype})"


class IndexedDatasetWriter:
    """Stream documents to ``PREFIX.bin``/``PREFIX.idx``; nothing appears at the target until finalize().

    Use as a context manager: a clean exit finalizes, an exception removes the temporaries.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = _strip_suffix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise RetroError(f"{self.prefix}: dtype {self.dtype} cannot be stored in an indexed dataset "
                             f"(use one of {sorted(str(np.dtype(v)) for v in DTYPES.values())})")
        if not self.prefix or self.prefix.endswith(("/", os.sep)):
            raise RetroError(f"output prefix '{self.prefix}' names a directory, not a file name; pass "
                             f"DIR/NAME to write DIR/NAME.bin and DIR/NAME.idx")
        self.bin_path, self.idx_path = Path(self.prefix + ".bin"), Path(self.prefix + ".idx")
        self._bin_tmp, self._idx_tmp = tmp_path(self.bin_path), tmp_path(self.idx_path)
        self._lengths = array.array("q")
        self._done = False
        try:
            self.bin_path.parent.mkdir(parents=True, exist_ok=True)
            self._bin = open(self._bin_tmp, "wb")
        except OSError as e:
            raise self._unwritable(e) from None

    def _unwritable(self, e: OSError) -> RetroError:
        why = "a file is in the way, not a directory" if isinstance(e, FileExistsError) else e.strerror or e
        where = f": {e.filename}" if e.filename else ""
        return RetroError(f"output prefix {self.prefix}: cannot write {self.bin_path.name} and "
                          f"{self.idx_path.name} there ({why}{where}); pass a prefix in a "
                          f"directory you can write to")

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as e:  # e.g. the disk is full
            self.abort()
            raise self._unwritable(e) from None

    def _cast(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype and arr.size:
            if arr.dtype.kind in "iu" and self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise RetroError(f"{self.bin_path}: token ids {lo}..{hi} do not fit {self.dtype}; "
                                     f"write with a wider dtype (int32)")
        return np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1)

    def add_document(self, tokens) -> None:
        """Append one document (= one sequence); an empty one is allowed."""
        arr = self._cast(tokens)
        self._write(arr.tobytes())
        self._lengths.append(arr.size)

    def add_documents(self, docs) -> None:
        """Append many documents at once (a list of arrays or lists)."""
        docs = [np.asarray(d).reshape(-1) if len(d) else np.zeros(0, self.dtype) for d in docs]
        if docs:
            self.add_flat(np.concatenate(docs), np.fromiter((d.size for d in docs), np.int64, len(docs)))

    def add_flat(self, tokens, lengths) -> None:
        """Append documents given as one flat token array and their lengths (must sum to its size)."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        arr = self._cast(tokens)
        if int(lengths.sum()) != arr.size or (lengths < 0).any():
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {arr.size} tokens were given")
        if (lengths >= 2**31).any():
            raise RetroError(f"{self.bin_path}: a document has 2**31 tokens or more, which the format cannot "
                             f"store; split it into smaller documents")
        self._write(arr.tobytes())
        self._lengths.frombytes(lengths.astype(np.int64).tobytes())

    def __len__(self) -> int:
        return len(self._lengths)

    def finalize(self) -> str:
        """Write the index and move both files into place (``.bin`` first, ``.idx`` last); return the prefix."""
        if self._done:
            return self.prefix
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if len(self._lengths) else np.zeros(0, np.int64)
        n = len(lengths)
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            with open(self._idx_tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], n, n + 1))
                f.write(lengths.astype("<i4").tobytes())
                f.write((arrays.offsets(lengths)[:-1] * self.dtype.itemsize).astype("<i8").tobytes())
                f.write(np.arange(n + 1, dtype="<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
            fsync_dir(self.idx_path.parent)
        except OSError as e:
            self.abort()
            raise self._unwritable(e) from None
        self._done = True
        return self.prefix

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        with contextlib.suppress(OSError):
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            with contextlib.suppress(OSError):
                os.unlink(p)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        elif not self._done:
            self.abort()
        return False


def write_indexed_dataset(prefix: str | os.PathLike, docs, dtype=np.uint16) -> str:
    """Write ``docs`` (a list of token arrays, one per document) as ``prefix.bin``/``.idx``; return the prefix."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        w.add_documents(docs)
    return w.prefix


# -- blends -------------------------------------------------------------------------------------------
def parse_blend(spec, check_files: bool = True) -> list[tuple[float, str]]:
    """Parse a corpus blend into ``[(weight, prefix), ...]``.

    Accepts ``"W1 P1 W2 P2 ..."``, a single ``"P"`` (weight 1.0), a Megatron ``data_path`` list
    (``["0.3", "a", "0.7", "b"]`` or ``["a"]``) or a list of ``(weight, prefix)`` pairs.
    """
    if isinstance(spec, (str, os.PathLike)):
        items = os.fspath(spec).split()
    elif spec and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in spec):
        items = [str(v) for pair in spec for v in pair]
    else:
        items = [os.fspath(x) if isinstance(x, os.PathLike) else str(x) for x in (spec or [])]
    shown = " ".join(items)
    if not items:
        raise RetroError("data path is empty; give 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...'")
    if len(items) == 1:
        pairs = [("1.0", items[0])]
    elif len(items) % 2:
        raise RetroError(f"data path '{shown}' has {len(items)} items, an odd number; give 'PREFIX' or "
                         f"weight/prefix pairs 'W1 PREFIX1 W2 PREFIX2 ...'")
    else:
        pairs = list(zip(items[0::2], items[1::2]))
    blend = []
    for w, p in pairs:
        try:
            weight = float(w)
        except ValueError:
            raise RetroError(f"data path '{shown}': weight '{w}' (before '{p}') is not a number; give "
                             f"'W1 PREFIX1 W2 PREFIX2 ...' with numeric weights") from None
        if not weight > 0 or not np.isfinite(weight):
            raise RetroError(f"data path '{shown}': weight {w} for '{p}' must be a positive number")
        p = _strip_suffix(p)
        if check_files:
            missing = [p + s for s in (".idx", ".bin") if not os.path.isfile(p + s)]
            if missing:
                raise RetroError(f"data path: corpus '{p}' not found ({' and '.join(missing)} missing); pass "
                                 f"the prefix of an existing PREFIX.bin + PREFIX.idx pair (without the suffix)")
        blend.append((weight, p))
    return blend


def blend_to_list(blend) -> list[str]:
    """Megatron-style ``data_path`` list ``["W1", "P1", "W2", "P2", ...]`` for a parsed blend."""
    return [s for w, p in blend for s in (repr(float(w)), str(p))]
