"""A training run's output directory and its checkpoints: where they are, what they hold, when a run may
continue from one (:mod:`embedder.trainer` runs the loop that writes them).

``output_dir`` holds, beside the final model, ``checkpoints/step-<N>/`` (each written atomically by rank 0:
``trainer_state.pt`` with the model, optimizer, scheduler, GradScaler, step and RNG states, loaded with
``torch.load(weights_only=True)``; ``sampler.json``, the batch sampler's state; ``meta.json``, the settings
and input digests a resume is checked against), ``loss_log.jsonl``, ``training_args.json`` and the manifest
of the entries the last final save wrote (:func:`save_model`). Which files of a model directory count, and
their content digest, are :mod:`embedder.model_files`'s (the rule the pipeline pins a build's model by).

Nothing here imports torch at module level, nor :mod:`embedder.trainer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedder.atomic import atomic_dir, atomic_path
from embedder.errors import UserError
from embedder.model_files import (CHECKPOINTS, DIGEST_PREFIX, LOSS_LOG, MODEL_MANIFEST, TRAINING_ARGS,
                                  TRAINING_OUTPUTS, WEIGHT_SUFFIXES, content_hash, model_files)

if TYPE_CHECKING:
    from embedder.tasks.base import Task
    from embedder.trainer import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "LOSS_LOG", "META_FILE", "MODEL_MANIFEST", "SAMPLER_FILE", "STATE_FILE", "TRAINING_ARGS",
           "TRAINING_OUTPUTS", "checkpoint_dir", "finished_model", "input_digests", "list_checkpoints",
           "refuse_existing_run", "resolve_resume", "save_checkpoint", "save_model"]

STATE_FILE = "trainer_state.pt"
SAMPLER_FILE = "sampler.json"
META_FILE = "meta.json"


# ====================================================================== where checkpoints are


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step}"


def list_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under output_dir/checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def finished_model(output_dir: str) -> bool:
    """Whether ``output_dir`` holds the final model of a finished run (:func:`save_model`'s manifest)."""
    return (Path(output_dir) / MODEL_MANIFEST).is_file() or (Path(output_dir) / TRAINING_ARGS).is_file()


def refuse_existing_run(cfg: TrainConfig, finished: bool = True) -> None:
    """A run without ``resume`` starts at step 0: it must not write its checkpoints beside an earlier run's
    (step-4 over the old step-4, next to the old step-8, which a later ``--resume latest`` would then take),
    nor, with ``finished``, train over an earlier run's final model. Either is a :class:`UserError` naming
    ``output_dir`` and the fix. (The Python API refuses checkpoints only; the ``train`` command both.)"""
    found = list_checkpoints(cfg.output_dir)
    done = finished and finished_model(cfg.output_dir)
    if found:
        what = f"checkpoints of an earlier run (newest: {found[-1][1]})" + (" and its final model" if done else "")
        raise UserError(f"--output-dir {cfg.output_dir} already holds {what}; continue that run with --resume "
                        f"latest, or pass another or an empty --output-dir to start a new one")
    if done:
        raise UserError(f"--output-dir {cfg.output_dir} already holds the final model of a finished run (and no "
                        f"checkpoint to resume from); pass another or an empty --output-dir (to train that model "
                        f"further: --model {cfg.output_dir} and a new --output-dir)")


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint directory ``cfg.resume`` names (None: start fresh). ``latest`` with no checkpoint under
    ``output_dir`` is a :class:`UserError` (it does not quietly start over)."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(cfg.output_dir)
        if not found:
            where = Path(cfg.output_dir) / CHECKPOINTS
            if finished_model(cfg.output_dir):
                raise UserError(f"--resume latest: no checkpoint under {where} (the run there finished without "
                                f"--save-every); to train its model further pass --model {cfg.output_dir} and a "
                                f"new --output-dir, without --resume")
            raise UserError(f"--resume latest: no checkpoint under {where} to continue from (checkpoints are "
                            f"written by --save-every N and --stop-after N); leave --resume out to start from step 0")
        return found[-1][1]
    p = Path(cfg.resume)
    if (p / CHECKPOINTS).is_dir() and not (p / STATE_FILE).exists():  # an output dir: its latest checkpoint
        found = list_checkpoints(str(p))
        if found:
            return found[-1][1]
    if not (p / STATE_FILE).is_file() or not (p / META_FILE).is_file():
        raise UserError(f"--resume {cfg.resume}: not a checkpoint directory (no {STATE_FILE} and {META_FILE}); "
                        f"pass a {CHECKPOINTS}/step-<N> directory of an earlier run, or 'latest'")
    return p


# ====================================================================== what a checkpoint holds


def _rng_state() -> dict:
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_checkpoint(cfg: TrainConfig, step: int, module, optimizer, scheduler, scaler, sampler,
                    inputs: dict[str, str]) -> Path:
    import torch

    target = checkpoint_dir(cfg.output_dir, step)
    with atomic_dir(target) as tmp:
        torch.save({"step": step, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state()},
                   tmp / STATE_FILE)
        with open(tmp / SAMPLER_FILE, "w", encoding="utf-8") as f:
            json.dump(_json_safe(sampler.state_dict()), f)
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump({"step": step, "task": cfg.task_name(), "batch_size": cfg.batch_size, "seed": cfg.seed,
                       "grad_accum": cfg.grad_accum, "num_workers": cfg.num_workers, "max_steps": cfg.max_steps,
                       "train_file": os.path.abspath(cfg.train_file), **_model_spec(cfg),
                       "task_options": _task_options(cfg),
                       "inputs": inputs, "time": time.time()},
                      f, indent=2)
    if cfg.keep_checkpoints:
        for _, old in list_checkpoints(cfg.output_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return target



# ====================================================================== when a run may resume from one


def _local_path(value):
    """A path that exists here, made absolute; anything else (a hub id, None) as given."""
    if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def _model_spec(cfg: TrainConfig) -> dict:
    """What the trained model is built from (checkpoint meta; a resume must name the same): local paths made
    absolute, hub ids and None as given."""
    spec = {}
    for key in ("model", "model_config", "tokenizer", "document_model"):
        value = _local_path(getattr(cfg.options, key))
        if isinstance(value, (str, type(None))):
            spec[key] = value
    return spec


def input_digests(cfg: TrainConfig) -> dict[str, str]:
    """Content digests of what a run reads (checkpoint meta; a resume refuses when one changed): the training
    file, and each local --model / --model-config / --tokenizer / --document-model but for model weights (the
    checkpoint holds the trained ones; a shape change is caught when they load). Hub ids are pinned by their
    id (:func:`_model_spec`)."""
    out = {"train_file": content_hash(cfg.train_file)}
    for key in ("model", "model_config", "tokenizer", "document_model"):
        value = getattr(cfg.options, key)
        p = Path(os.path.expanduser(value)) if isinstance(value, str) else None
        if p is not None and p.is_file():
            out[key] = content_hash(p)
        elif p is not None and p.is_dir():
            h = hashlib.sha256()
            for q in model_files(p):
                if not q.name.endswith(WEIGHT_SUFFIXES):
                    h.update(f"{q.relative_to(p).as_posix()}\0{content_hash(q)}\0".encode())
            out[key] = DIGEST_PREFIX + h.hexdigest()[:32]
    return out


_OPTION_NAMES = {"train_file": "--train-file", "model": "--model", "model_config": "--model-config",
                 "tokenizer": "--tokenizer", "document_model": "--document-model"}


def _task_options(cfg: TrainConfig) -> dict:
    """The task's declared options that change the trained model, as this run has them
    (:meth:`embedder.tasks.base.Task.recorded_options`)."""
    from embedder.tasks import task_class

    return task_class(cfg.task).recorded_options(cfg.options)


def _check_resumable(cfg: TrainConfig, meta: dict, where: Path, max_steps: int, inputs: dict[str, str]) -> None:
    spec = [(k, v) for k, v in _model_spec(cfg).items() if k in meta]   # older checkpoints lack these keys
    spec += [("train_file", os.path.abspath(cfg.train_file))] if "train_file" in meta else []
    for key, now in [("task", cfg.task_name()), ("batch_size", cfg.batch_size), ("seed", cfg.seed)] + spec:
        if meta.get(key) != now:
            raise UserError(f"--resume {where}: that checkpoint was written with {key}={meta.get(key)!r}, this run "
                            f"has {key}={now!r}; resume with the same settings or start a new --output-dir")
    then_options = meta.get("task_options")   # older checkpoints lack them
    for key, now in (_task_options(cfg).items() if then_options is not None else ()):
        if key in then_options and then_options[key] != now:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume {where}: that checkpoint was written with {flag} {then_options[key]!r}, this "
                            f"run has {flag} {now!r}; resume with the same settings or start a new --output-dir")
    stored = meta.get("inputs") or {}
    earlier = [k for k, then in stored.items() if not str(then).startswith(DIGEST_PREFIX)]
    if earlier:   # digests of an older rule (whole files up to 64 MiB): not comparable with this rule's
        log.warning("--resume %s: that checkpoint's content digests of %s were taken by an earlier rule and are not "
                    "compared: the run goes on, assuming the same inputs", where,
                    ", ".join(_OPTION_NAMES.get(k, k) for k in earlier))
    for key, then in stored.items():
        if key not in earlier and inputs.get(key) != then:
            what = "file" if key in ("train_file", "model_config") else "files"
            raise UserError(f"--resume {where}: {_OPTION_NAMES.get(key, key)} {meta.get(key) or ''}: its {what} "
                            f"changed since that checkpoint was written (content digest differs); resume with the "
                            f"inputs the run started from, or start a new --output-dir")
    for key in ("grad_accum", "num_workers"):
        if meta.get(key) != getattr(cfg, key):
            log.warning("--resume %s: %s was %s, now %s: the run goes on, but not exactly as it would have",
                        where, key, meta.get(key), getattr(cfg, key))
    if meta["step"] >= max_steps:
        log.warning("--resume %s: the checkpoint is at step %d, max steps is %d: nothing left to train",
                    where, meta["step"], max_steps)


# ====================================================================== the final model


def save_model(task: Task, module, output_dir: str) -> None:
    """``task.save`` into ``output_dir`` without touching its checkpoints and logs: the task saves (atomically)
    into a staging directory beside them, whose entries are then moved in one by one (``os.replace``);
    entries an earlier final save wrote and this one does not are removed."""
    out = Path(os.path.abspath(output_dir))
    staging = out / f".model.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with warnings.catch_warnings(record=True) as caught:   # said of the output directory, not the staging one
            warnings.simplefilter("always")
            task.save(getattr(module, "module", module), str(staging))
        for w in caught:
            log.warning("%s", str(w.message).replace(str(staging), str(out)))
        names = sorted(os.listdir(staging))
        clash = [n for n in names if n in TRAINING_OUTPUTS]
        if clash:
            raise RuntimeError(f"task.save wrote {clash}, names the trainer keeps for itself")
        previous = []
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads((out / MODEL_MANIFEST).read_text())
        for name in names:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        for name in set(previous) - set(names) - TRAINING_OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        with atomic_path(out / MODEL_MANIFEST) as tmp:
            tmp.write_text(json.dumps(names))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
