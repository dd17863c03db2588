"""Training data: JSONL rows, pair rows, and the batch sampler that keeps false negatives out of a batch.

Files are JSON Lines (optionally gzip-compressed, ``.gz``): one JSON object per line, blank lines skipped.
:func:`read_rows` parses them and hands every object to the task's ``check_row`` with its "file:line".

Pair rows (the contrastive task, :mod:`embedder.evaluate`) are::

    {"query": "...", "pos": "..."}                          # or "document" / "doc" / "passage" for "pos"
    {"query": "...", "pos": ["first", "second"], "neg": ["hard negative", "..."]}

``pos`` may be a string or a non-empty list of strings: the *first* is the positive the row trains with (its
document column in the batch); every listed positive counts as relevant (evaluation) and is never used as a
negative of that query (training masks it out). ``neg`` (optional) is a string or a list of strings: hard
negatives. :func:`pair_row` normalises a row to ``{"query": str, "pos": str, "positives": [str, ...],
"neg": [str, ...]}`` (``positives[0] == pos``; negatives deduplicated, and any negative that equals one of
the row's positives dropped). Texts are compared by :func:`doc_key` (whitespace collapsed), so two texts
that differ only in spacing count as the same document everywhere (dedup, masking, batch groups).

Nothing here imports torch.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import abc, deque
from itertools import islice
from typing import Any, Hashable, Iterator, Sequence

import numpy as np

from embedder.errors import UserError

POSITIVE_KEYS = ("pos", "document", "doc", "passage")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------- JSONL


def read_rows(path: str | os.PathLike, task=None) -> list[dict]:
    """Every row of the JSONL file ``path``, each passed through ``task.check_row(row, "path:line")`` (raw
    objects when ``task`` is None). Blank lines are skipped; a line that is not one JSON object, or a file
    with no rows, is a :class:`UserError` naming the file (and line)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    rows: list[dict] = []
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    rows.append(_parse_line(raw, lineno, path, task))
    except (OSError, EOFError) as e:  # missing / unreadable file, corrupt gzip
        raise UserError(f"cannot read training file '{path}' ({type(e).__name__}: {e}); pass an existing "
                        "JSONL file") from None
    if not rows:
        raise UserError(f"{path}: holds no rows; each line must be one JSON object")
    return rows


def _parse_line(raw: bytes, lineno: int, path: str, task) -> dict:
    """One non-blank line of a JSONL file -> its row, checked by ``task`` (errors name "path:line")."""
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not a JSON object ({e.msg} at column {e.colno}); each line must be one JSON "
                        "object") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: not a JSON object (got {_json_type(row)}); each line must be one JSON object")
    return task.check_row(row, where) if task is not None else row


class RowFile:
    """The rows of a JSONL training file without holding them in memory: one pass reads every line, checks
    its row (``task.check_row``, errors naming "file:line" as :func:`read_rows` does) and keeps only where the
    line starts (8 bytes a row) and, for a task that names batch groups, a 64-bit hash of the row's group key
    (8 bytes more); ``rows[i]`` reads line ``i`` back, parses and checks it again. Memory stays flat however
    large the file (a gzip file is first decompressed to a temporary file, removed by :meth:`close`).

    ``groups`` is the array of group hashes (None for a task without groups), for
    :class:`NoDuplicateBatchSampler`: two rows share a hash when their keys are equal (a different pair of
    keys collides with probability 2**-64)."""

    def __init__(self, path: str | os.PathLike, task=None):
        import array
        import tempfile

        self.path = os.fspath(path)
        self.task = task
        self._spool = None
        offsets, lines, groups = array.array("q"), array.array("q"), array.array("q")
        grouped = None
        try:
            if self.path.endswith(".gz"):
                self._spool = tempfile.NamedTemporaryFile(prefix="rows-", suffix=".jsonl")
                with gzip.open(self.path, "rb") as z:
                    for block in iter(lambda: z.read(1 << 20), b""):
                        self._spool.write(block)
                self._spool.flush()
            self._file = open(self._spool.name if self._spool else self.path, "rb")
            at = 0
            for lineno, raw in enumerate(self._file, 1):
                start, at = at, at + len(raw)
                if not raw.strip():
                    continue
                row = _parse_line(raw, lineno, self.path, task)
                if task is not None:
                    key = task.batch_groups([row])
                    grouped = key is not None if grouped is None else grouped
                    if grouped:
                        groups.append(_key_hash(key[0]))
                offsets.append(start)
                lines.append(lineno)
        except (OSError, EOFError) as e:  # missing / unreadable file, corrupt gzip
            self.close()
            raise UserError(f"cannot read training file '{self.path}' ({type(e).__name__}: {e}); pass an existing "
                            "JSONL file") from None
        except BaseException:
            self.close()
            raise
        if not offsets:
            self.close()
            raise UserError(f"{self.path}: holds no rows; each line must be one JSON object")
        self._offsets = np.frombuffer(offsets, dtype=np.int64)
        self._lines = np.frombuffer(lines, dtype=np.int64)
        self.groups = np.frombuffer(groups, dtype=np.int64) if grouped else None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> dict:
        self._file.seek(int(self._offsets[i]))
        return _parse_line(self._file.readline(), int(self._lines[i]), self.path, self.task)

    def close(self) -> None:
        for f in (getattr(self, "_file", None), self._spool):
            if f is not None:
                f.close()

    def __enter__(self) -> "RowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key_hash(key: Hashable) -> int:
    import hashlib

    data = key.encode("utf-8") if isinstance(key, str) else repr(key).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------------- pair rows


def doc_key(text: str) -> str:
    """What makes two texts the same document: the text with runs of whitespace collapsed and ends stripped."""
    return " ".join(text.split())


def _texts(value, key: str, where: str, allow_empty_list: bool) -> list[str]:
    what = "a string or a list of strings" if allow_empty_list else \
        "a non-empty string or a non-empty list of non-empty strings"
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list) or (not value and not allow_empty_list):
        raise UserError(f"{where}: '{key}' must be {what}, got {_json_type(value)}")
    for v in value:
        if not isinstance(v, str):
            raise UserError(f"{where}: '{key}' must be {what}, got an array holding {_json_type(v)}")
        if not v.strip():
            raise UserError(f"{where}: '{key}' holds an empty text; remove it")
    return value


def pair_row(row: dict, where: str) -> dict:
    """A raw pair row -> ``{"query", "pos", "positives", "neg"}`` (see the module docstring); a bad row is a
    :class:`UserError` naming ``where``. An already normalised row (it has ``positives``) passes through."""
    if _is_normalised(row):
        return row
    if "query" not in row:
        raise UserError(f"{where}: no 'query'; a pair row needs 'query' and a positive ('pos', 'document', "
                        "'doc' or 'passage')")
    query = row["query"]
    if not isinstance(query, str) or not query.strip():
        raise UserError(f"{where}: 'query' must be a non-empty string, got "
                        f"{'an empty string' if isinstance(query, str) else _json_type(query)}")
    given = [k for k in POSITIVE_KEYS if k in row]
    if not given:
        raise UserError(f"{where}: no positive; give the query's relevant text as 'pos' (or 'document', 'doc', "
                        "'passage')")
    if len(given) > 1:
        raise UserError(f"{where}: the positive is given twice ({' and '.join(repr(k) for k in given)}); keep one")
    positives = list(dict.fromkeys(_texts(row[given[0]], given[0], where, allow_empty_list=False)))
    neg = row.get("neg")
    neg = [] if neg is None else _texts(neg, "neg", where, allow_empty_list=True)
    pos_keys = {doc_key(p) for p in positives}
    seen: set[str] = set()
    negatives = []
    for n in neg:
        k = doc_key(n)
        if k not in pos_keys and k not in seen:
            seen.add(k)
            negatives.append(n)
    return {"query": query, "pos": positives[0], "positives": positives, "neg": negatives}


def _is_normalised(row: dict) -> bool:
    """Exactly what :func:`pair_row` returns (so a raw row carrying a stray "positives" is still checked)."""
    positives, neg = row.get("positives"), row.get("neg")
    return (row.keys() == {"query", "pos", "positives", "neg"} and isinstance(row["query"], str)
            and isinstance(positives, list) and bool(positives) and positives[0] == row["pos"]
            and isinstance(neg, list) and all(isinstance(t, str) for t in (*positives, *neg)))


def pair_rows(rows: Sequence[dict], where: str = "row") -> list[dict]:
    """:func:`pair_row` over a list (raw or already normalised rows); errors name ``where <index>``."""
    return [pair_row(r, f"{where} {i}") for i, r in enumerate(rows)]


def pair_row_json(row: dict) -> dict:
    """A normalised pair row as a JSONL object that :func:`pair_row` reads back to the same row."""
    out: dict[str, Any] = {"query": row["query"],
                           "pos": row["positives"] if len(row["positives"]) > 1 else row["pos"]}
    if row["neg"]:
        out["neg"] = row["neg"]
    return out


# ---------------------------------------------------------------------- batches


class NoDuplicateBatchSampler:
    """Batches of row indices in which no group key occurs twice (for pair rows: the positive document, so an
    in-batch negative is never another copy of the query's own positive).

    Each epoch is a function of (``seed``, epoch) only: a permutation of all rows from
    ``numpy.random.default_rng([seed, epoch])`` is walked in order, filling one batch at a time. A row whose
    group is already in the batch being filled is *deferred*: set aside (per group, in order) and placed
    first into a later batch: every new batch starts with the oldest deferred row of each deferred group (at
    most one per group, groups in the order they were first deferred), then continues with the permutation.
    Once the permutation is used up, the deferred rows still waiting fill the final batches, so every row
    appears exactly once per epoch. A group holding a large share of the rows can therefore leave a tail of
    small batches (one row per remaining copy); ``drop_last`` drops every batch smaller than ``batch_size``
    (only these tail batches ever are).

    Iterating yields the current epoch's batches from the current position and counts them; when the epoch
    ends the sampler moves to the next epoch (position 0), so iterating again gives the next epoch.
    :meth:`state_dict` / :meth:`load_state_dict` hold (epoch, position): a resumed run continues mid-epoch
    with exactly the batches that were still to come. The position counts the batches handed out by
    iteration; a trainer that prefetches should save its own count of *consumed* batches instead (that is
    what :meth:`load_state_dict` takes). :meth:`epoch_batches` gives any epoch's batches directly.
    """

    def __init__(self, groups: Sequence[Hashable] | None, batch_size: int, seed: int = 0, drop_last: bool = False,
                 num_rows: int | None = None):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch_size={batch_size!r} must be a positive integer")
        if groups is None and num_rows is None:
            raise ValueError("pass groups, or num_rows for rows without groups")
        self.groups = (groups if isinstance(groups, np.ndarray) else list(groups)) if groups is not None else None
        self.num_rows = len(self.groups) if self.groups is not None else int(num_rows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (lists of row indices), as described in the class docstring."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
        bs, groups = self.batch_size, self.groups
        batches: Sequence[list[int]]
        if groups is None:   # slices of the permutation, made when asked for: no list of every row
            batches = _Slices(perm, bs, self.drop_last)
        else:
            perm = perm.tolist()
            batches = []
            deferred: dict[Hashable, deque] = {}   # group -> its deferred rows; insertion order = first deferral
            p, n = 0, len(perm)
            while p < n or deferred:
                batch: list[int] = []
                keys: set = set()
                for g in list(islice(deferred, bs)):  # the batch is empty: these distinct groups all fit
                    queue = deferred[g]
                    batch.append(queue.popleft())
                    keys.add(g)
                    if not queue:
                        del deferred[g]
                while len(batch) < bs and p < n:
                    i = perm[p]
                    p += 1
                    g = groups[i]
                    if g in keys:
                        deferred.setdefault(g, deque()).append(i)
                    else:
                        batch.append(i)
                        keys.add(g)
                batches.append(batch)
        if self.drop_last and groups is not None:
            batches = [b for b in batches if len(b) == bs]
        self._cache = (int(epoch), batches)
        return batches

    def __len__(self) -> int:
        """Batches in the current epoch (the count can change from epoch to epoch when rows are deferred)."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield list(batch)
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (a no-op when already in that epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": self.num_rows,
                "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_rows", "batch_size", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"cannot resume the batch order: the checkpoint has {key}={state[key]!r}, this run "
                                f"{getattr(self, key)!r}; resume with the same data, seed and batch size")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class _Slices(abc.Sequence):
    """Batches of ``size`` consecutive entries of a permutation (the last one shorter unless dropped), as
    lists of ints made when indexed."""

    def __init__(self, perm: np.ndarray, size: int, drop_last: bool):
        self.perm, self.size = perm, size
        self.count = len(perm) // size if drop_last else -(-len(perm) // size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(self.count))]
        if not -self.count <= k < self.count:
            raise IndexError(k)
        k %= self.count
        return self.perm[k * self.size:(k + 1) * self.size].tolist()

    def __eq__(self, other) -> bool:
        return list(self) == list(other)
