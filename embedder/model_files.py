"""Which files a model directory is made of, and the one content digest of a file: the rules both packages pin
their inputs by (a build's input record in :mod:`retro_pipeline.fingerprints`, a training run's checkpoints in
:mod:`embedder.checkpoints`). The pipeline imports these; nothing here imports the pipeline, torch or numpy.

The digest (:func:`content_hash`) reads a file whole up to 8 MiB, else its size plus 16 evenly spaced 256 KiB
pieces and its last 256 KiB (a rewrite that keeps the size and every sampled piece would go unseen). Its
values are stored in workdirs (``config.json``'s ``inputs``) and in checkpoints (``meta.json``'s ``inputs``)
and compared on every later run, so the rule must not change; the ``sha256-sampled:`` prefix names it.

A model directory's files (:func:`model_files`): in the output directory of a training run, the entries its
final save wrote (the manifest ``.model_files.json``), else every entry but what training writes beside a
model (checkpoints, loss log, training arguments); in either, every file below them but hidden ones (a name
starting with ``.``, or below a directory whose name does).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# What a training run writes into its output directory beside the model.
CHECKPOINTS = "checkpoints"
LOSS_LOG = "loss_log.jsonl"
TRAINING_ARGS = "training_args.json"
MODEL_MANIFEST = ".model_files.json"   # which entries of output_dir the last final save wrote
TRAINING_OUTPUTS = {CHECKPOINTS, LOSS_LOG, TRAINING_ARGS, MODEL_MANIFEST}

# Suffixes of weight files (the trainer's resume check leaves them out: a checkpoint holds the trained weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")

DIGEST_PREFIX = "sha256-sampled:"
WHOLE = 8 << 20
PIECE = 256 << 10
PIECES = 16


def content_hash(path: str | os.PathLike) -> str:
    """The content digest of a file (``sha256-sampled:`` and 32 hex digits)."""
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
    return DIGEST_PREFIX + h.hexdigest()[:32]


def model_entries(directory: str | os.PathLike) -> list[Path]:
    """The top-level entries of a model directory that make the model: those the last final save of a training
    run wrote (its manifest), or, without a manifest, every entry but training's outputs."""
    d = Path(directory)
    try:
        names = json.loads((d / MODEL_MANIFEST).read_text())
    except (OSError, ValueError):
        names = None
    if isinstance(names, list) and names and all(isinstance(n, str) and n and "/" not in n for n in names):
        return [d / n for n in names]
    return sorted(e for e in d.iterdir() if e.name not in TRAINING_OUTPUTS)


def model_files(directory: str | os.PathLike) -> list[Path]:
    """Every file of a model directory that makes the model (see the module's rule), sorted; paths below
    ``directory`` as given."""
    d = Path(directory)
    out = []
    for e in model_entries(d):
        for q in ([e] if e.is_file() else e.rglob("*")):
            if q.is_file() and not any(part.startswith(".") for part in q.relative_to(d).parts):
                out.append(q)
    return sorted(out)
