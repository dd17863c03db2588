"""The one training loop of every task (:mod:`embedder.tasks`): one process, or Ray Train data-parallel workers.

What the loop does, step by step (a *step* is one optimizer update on one *global batch* of ``batch_size``
rows):

1. The batch sampler (:class:`embedder.data.NoDuplicateBatchSampler`; with the task's batch groups, when it
   names keys one batch must not hold twice) gives the global batch's row indices; it is a function of
   (seed, epoch) only.
2. With ``num_workers = N``, worker ``r`` takes rows ``r::N`` of the global batch and splits its share into
   ``grad_accum`` micro-batches of ``batch_size / (N * grad_accum)`` rows (it must divide).
3. Each micro-batch is collated by the task with a ``numpy.random.Generator`` seeded from
   (seed, step, micro-batch index ``m * N + r``), and torch's RNG (dropout) is seeded from (seed, step, rank)
   at the start of every step: a run is a function of its settings, which is what makes ``resume`` exact.
4. Loss / grad_accum is back-propagated (under fp16/bf16 autocast on CUDA when asked; fp16 with a
   GradScaler); with N > 1 the module is wrapped in ``DistributedDataParallel``, which averages gradients
   over the workers on the last micro-batch (``no_sync`` before it), so the update is the one of the mean
   loss over the whole global batch. Tasks whose loss uses other workers' examples (in-batch negatives)
   get ``gather``, an all-gather whose backward all-reduces the gradient and keeps the local slice, so
   that the gradient equals the one-worker gradient. A task with ``caches_gradients`` (contrastive) instead
   collates its whole share once and runs it in ``grad_accum`` pieces through :mod:`embedder.gradcache`, so the
   loss (and its in-batch negatives) is the whole batch's at any ``grad_accum``.
5. Gradients are clipped to ``max_grad_norm``; AdamW (no weight decay on biases and norms: parameters of
   one dimension) steps; the LR follows linear warmup then linear decay to 0 at ``max_steps``.
6. The logged loss is the global-batch mean (all-reduced over workers), written with the LR to
   ``output_dir/loss_log.jsonl`` (one JSON object per step) and, when asked, to TensorBoard.

Checkpoints (:mod:`embedder.checkpoints`): every ``save_every`` steps (and at the last step of a run) rank 0
writes ``output_dir/checkpoints/step-<N>/`` atomically: ``trainer_state.pt`` (model, optimizer, scheduler,
GradScaler, step, RNG states; loaded with ``torch.load(weights_only=True)``), ``sampler.json`` and
``meta.json``. ``resume`` ("latest" or a checkpoint directory) continues exactly: on CPU the resumed run's
final weights equal an uninterrupted run's bit for bit (same settings, same worker count). ``resume="latest"``
with no checkpoint is refused, and so is a run without ``resume`` into an ``output_dir`` that holds
checkpoints (:func:`~embedder.checkpoints.refuse_existing_run`; the ``train`` command also refuses one that
holds a finished model). Ray Train's workers are started by :mod:`embedder.train_ray`.

At the end rank 0 saves the encoder (``task.save``: only the encoder; :func:`~embedder.checkpoints.save_model`)
into ``output_dir``, next to ``checkpoints/``, ``loss_log.jsonl`` and ``training_args.json``;
``embedder.Encoder.load(output_dir)`` and ``retro-pipeline build --embedder output_dir`` take it.

Equivalence of worker counts: with the same global batch, N workers give the one-worker loss curve to float
noise (measured on CPU: tiny BERT, in-batch InfoNCE through ``gather``, 2 workers vs 1, largest relative
difference of the per-step losses 7.5e-8 over 4 steps) for tasks whose collate
draws no randomness and whose model has no dropout; masks and dropout are drawn per worker (and per piece),
so masking tasks, and any model with dropout (MiniLM: per-step losses 15-89% apart), match only in
distribution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from embedder.atomic import atomic_path
from embedder.checkpoints import (CHECKPOINTS, LOSS_LOG, META_FILE, MODEL_MANIFEST, SAMPLER_FILE, STATE_FILE,
                                  TRAINING_ARGS, TRAINING_OUTPUTS, _check_resumable, _local_path, _set_rng_state,
                                  checkpoint_dir, finished_model, input_digests, list_checkpoints,
                                  refuse_existing_run, resolve_resume, save_checkpoint, save_model)
from embedder.errors import UserError
from embedder.settings import no_hf_bars
from embedder.tasks import task_class
from embedder.tasks.base import Task, TaskOptions
from embedder.train_ray import Gather, _train_ray

log = logging.getLogger(__name__)

# Re-exported: the output directory's names and checkpoint functions live in embedder.checkpoints, Ray Train
# runs in embedder.train_ray; callers import them from here as well.
__all__ = ["CHECKPOINTS", "LOSS_LOG", "META_FILE", "MODEL_MANIFEST", "PRECISIONS", "SAMPLER_FILE", "STATE_FILE",
           "TRAINING_ARGS", "TRAINING_OUTPUTS", "Gather", "TrainConfig", "absolute_paths", "check_config",
           "checkpoint_dir", "finished_model", "input_digests", "linear_warmup_decay", "list_checkpoints",
           "make_sampler", "read_rows", "refuse_existing_run", "resolve_resume", "save_checkpoint", "save_model",
           "task_class", "train"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run depends on (``training_args.json`` records it)."""

    task: Any                                   # a task name (embedder.tasks.TASK_MODULES) or a Task subclass
    train_file: str
    output_dir: str
    options: TaskOptions = field(default_factory=TaskOptions)
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None             # default 0; or warmup_ratio of max_steps
    warmup_ratio: float | None = None
    max_steps: int | None = None                # one of max_steps / epochs; neither: 1 epoch
    epochs: float | None = None
    batch_size: int = 32                        # global: rows per optimizer step, all workers together
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0           # None or 0: no clipping
    precision: str = "auto"                     # auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    seed: int = 0
    save_every: int | None = None               # steps between checkpoints (None: only at the end of a run)
    keep_checkpoints: int | None = None         # newest checkpoints kept (None: all)
    log_every: int = 10                         # steps between progress/TensorBoard updates
    tensorboard: str | None = None              # a TensorBoard log directory (needs the tensorboard package)
    resume: str | None = None                   # "latest" or a checkpoint directory
    stop_after: int | None = None               # stop this run at this step (with a checkpoint); resume goes on
    num_workers: int = 1                        # >1: Ray Train data-parallel workers
    use_gpu: bool | None = None                 # None: CUDA when there is one
    address: str | None = None                  # Ray cluster; None: a running session or a new local Ray
    progress: bool = True
    device: str | None = None                   # one-process runs: override the device ("cpu", "cuda:1")

    def task_name(self) -> str:
        return self.task if isinstance(self.task, str) else (getattr(self.task, "name", "") or self.task.__name__)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out["task"] = self.task_name()
        out["options"] = self.options.to_json()
        return out


# ====================================================================== schedule


def linear_warmup_decay(warmup_steps: int, max_steps: int):
    """LR multiplier of step ``s`` (0-based, as LambdaLR counts): s/warmup while warming up, then linearly
    down to 0 at ``max_steps`` (the Hugging Face linear schedule)."""

    def f(s: int) -> float:
        if s < warmup_steps:
            return s / max(1, warmup_steps)
        return max(0.0, (max_steps - s) / max(1, max_steps - warmup_steps))

    return f


# ====================================================================== data (embedder.data)


def read_rows(path: str, task: Task):
    """The task's rows of a JSONL file, read back on demand (:class:`embedder.data.RowFile`: a worker holds
    line offsets, not rows, however large the file; errors name file:line)."""
    from embedder.data import RowFile

    return RowFile(path, task)


def make_sampler(task: Task, rows, batch_size: int, seed: int):
    """The sampler of global batches (:class:`embedder.data.NoDuplicateBatchSampler`): no group twice in a
    batch when the task names groups (``rows.groups``, or ``task.batch_groups(rows)`` for a list of rows), a
    plain seeded order otherwise; full batches only (``drop_last``), so every step has ``batch_size`` rows.
    Its state (epoch, position) is JSON."""
    import numpy as np

    from embedder.data import NoDuplicateBatchSampler

    groups = rows.groups if hasattr(rows, "groups") else task.batch_groups(rows)
    if groups is not None:
        distinct = len(np.unique(np.asarray(groups))) if isinstance(groups, np.ndarray) else len(set(groups))
        if distinct < batch_size:
            raise UserError(f"--train-file has {distinct} distinct examples (batch groups), fewer than "
                            f"--batch-size {batch_size}; lower the batch size or add rows")
        return NoDuplicateBatchSampler(groups, batch_size, seed, drop_last=True)
    return NoDuplicateBatchSampler(None, batch_size, seed, drop_last=True, num_rows=len(rows))


def _global_batches(sampler, n_rows: int, batch_size: int) -> Iterator[list[int]]:
    """The sampler's batches, epoch after epoch, without end. One pass may be empty (a checkpoint written
    after the last batch of an epoch resumes there: that pass only moves the sampler to the next epoch);
    two empty passes in a row mean no batch fits."""
    empty = 0
    while True:
        got = False
        for b in sampler:
            got, empty = True, 0
            yield [int(i) for i in b]
        empty = 0 if got else empty + 1
        if empty >= 2:
            raise UserError(f"--train-file has {n_rows} rows, too few for one batch of --batch-size "
                            f"{batch_size}; lower the batch size or add rows")


# ====================================================================== checks


def check_config(cfg: TrainConfig) -> None:
    """The mistakes that can be named before anything loads."""
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise UserError("give --max-steps or --epochs, not both")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"--max-steps {cfg.max_steps}: must be at least 1")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise UserError(f"--epochs {cfg.epochs}: must be positive")
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        raise UserError("give --warmup-steps or a warmup ratio, not both")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise UserError(f"warmup ratio {cfg.warmup_ratio}: must be in [0, 1)")
    for name in ("batch_size", "grad_accum", "num_workers", "log_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: must be a positive integer")
    parts = cfg.num_workers * cfg.grad_accum
    if cfg.batch_size % parts:
        raise UserError(f"--batch-size {cfg.batch_size} does not divide into --num-workers {cfg.num_workers} x "
                        f"--grad-accum {cfg.grad_accum} = {parts} equal micro-batches; use a multiple of {parts}")
    if cfg.lr <= 0:
        raise UserError(f"--lr {cfg.lr}: must be positive")
    if cfg.save_every is not None and cfg.save_every < 1:
        raise UserError(f"--save-every {cfg.save_every}: must be at least 1")
    if cfg.keep_checkpoints is not None and cfg.keep_checkpoints < 1:
        raise UserError(f"keep_checkpoints {cfg.keep_checkpoints}: must be at least 1")
    if not os.path.isfile(cfg.train_file):
        raise UserError(f"--train-file {cfg.train_file}: no such file; pass a JSONL file (one JSON object per line)")
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UserError(f"--output-dir {cfg.output_dir}: exists and is not a directory")
    if cfg.tensorboard:
        _summary_writer_class()
    task_class(cfg.task).resolve_options(cfg.options)   # a bad task option fails before anything loads
    if cfg.resume:
        resolve_resume(cfg)          # a resume with nothing to resume from fails before anything loads
    else:
        refuse_existing_run(cfg, finished=False)


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed; install it with "
                        "pip install tensorboard, or leave --tensorboard out (the loss log is written anyway)") from None
    return SummaryWriter


# ====================================================================== the loop's helpers


def _to_device(obj, device):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _resolve_precision(precision: str, device) -> str:
    import torch

    cuda = device.type == "cuda"
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision in ("fp16", "bf16") and not cuda:
        raise UserError(f"--precision {precision} needs CUDA (autocast runs on GPUs only here); this run is on "
                        f"{device}: use --precision fp32 or auto")
    return precision


def _param_groups(module, params, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases and norm weights)."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


# ====================================================================== the loop


# No transformers "Loading weights" / "Writing model shards" bars (a second's bar per worker, around the
# training bar, and there even with --no-progress).
_no_hf_bars = no_hf_bars


def _train_loop(cfg: TrainConfig, rank: int, world: int, device) -> dict:
    """One worker's loop (the only one when world == 1); returns the summary on rank 0."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from embedder.gradcache import cached_backward

    t0 = time.time()
    main = rank == 0
    torch.manual_seed(_step_seed(cfg.seed, 0, rank))
    task = task_class(cfg.task)(cfg.options)
    inputs = input_digests(cfg)   # before the rows are read: what this run trains on, as its checkpoints say
    rows = read_rows(cfg.train_file, task)
    sampler = make_sampler(task, rows, cfg.batch_size, cfg.seed)
    per_epoch = len(sampler)
    if per_epoch < 1:
        raise UserError(f"--train-file {cfg.train_file} has {len(rows)} rows, too few for one batch of --batch-size "
                        f"{cfg.batch_size}; lower the batch size or add rows")
    max_steps = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1) * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * max_steps)
    stop = min(max_steps, cfg.stop_after) if cfg.stop_after else max_steps
    micro = cfg.batch_size // (world * cfg.grad_accum)
    precision = _resolve_precision(cfg.precision, device)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    resumed = resolve_resume(cfg)
    if resumed is not None:  # checked before the model loads: a refused resume fails in a moment
        with open(resumed / META_FILE, encoding="utf-8") as f:
            meta = json.load(f)
        _check_resumable(cfg, meta, resumed, max_steps, inputs)

    with _no_hf_bars():
        module = task.build(device)
    module.to(device)
    module.train()
    params = [p for p in task.trainable(module)]
    if not params:
        raise UserError(f"task {cfg.task_name()} has no trainable parameters")
    optimizer = torch.optim.AdamW(_param_groups(module, params, cfg.weight_decay), lr=cfg.lr)
    scheduler = LambdaLR(optimizer, linear_warmup_decay(warmup, max_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    start = 0
    if resumed is not None:
        state = torch.load(resumed / STATE_FILE, map_location="cpu", weights_only=True)
        try:
            module.load_state_dict(state["model"])
        except RuntimeError as e:  # a model of another shape than the checkpoint's (its files changed)
            raise UserError(f"--resume {resumed}: the checkpoint's weights do not fit the model this run builds "
                            f"({str(e).strip().splitlines()[-1].strip()}); resume with the model the run started "
                            f"from, or start a new --output-dir") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        with open(resumed / SAMPLER_FILE, encoding="utf-8") as f:
            sampler.load_state_dict(json.load(f))
        _set_rng_state(state["rng"])
        start = int(state["step"])
        del state
        if main:
            log.info("resumed from %s (step %d)", resumed, start)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=True)
        gather = Gather(rank, world)
    else:
        wrapped, gather = module, None

    log_file = writer = bar = None
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        log_file = _open_loss_log(out / LOSS_LOG, start)
        if cfg.tensorboard:
            writer = _summary_writer_class()(cfg.tensorboard)
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop, initial=start, desc=f"train {cfg.task_name()}", unit="step", dynamic_ncols=True)

    batches = _global_batches(sampler, len(rows), cfg.batch_size)
    cached = cfg.grad_accum > 1 and task.caches_gradients
    last_loss, saved, window = None, [], []
    try:
        for step in range(start + 1, stop + 1):
            idx = next(batches)
            local = idx[rank::world]
            torch.manual_seed(_step_seed(cfg.seed, step, rank))
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            metric_sums: dict[str, float] = {}
            autocast = partial(torch.autocast, device.type, dtype=amp_dtype or torch.float32,
                               enabled=amp_dtype is not None)
            if cached:   # the whole local share as one batch (grad-accum 1's), embedded in grad_accum pieces
                rng = np.random.default_rng([cfg.seed, step, rank])
                batch = _to_device(task.collate([rows[i] for i in local], rng), device)
                loss, metrics = cached_backward(task, wrapped, batch, cfg.grad_accum, gather=gather,
                                                autocast=autocast, scale=scaler.scale, device=device,
                                                no_sync=wrapped.no_sync if world > 1 else contextlib.nullcontext)
                loss_sum += loss.detach().double() * cfg.grad_accum
                metric_sums = {k: float(v) * cfg.grad_accum for k, v in (metrics or {}).items()}
            for m in range(0 if cached else cfg.grad_accum):
                part = [rows[i] for i in local[m * micro:(m + 1) * micro]]
                rng = np.random.default_rng([cfg.seed, step, m * world + rank])
                batch = _to_device(task.collate(part, rng), device)
                sync = wrapped.no_sync() if world > 1 and m < cfg.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        loss, metrics = task.loss(wrapped, batch, gather)
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().double()
                for k, v in (metrics or {}).items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(loss_sum)
            step_loss = float(loss_sum) / (cfg.grad_accum * world)
            if not math.isfinite(step_loss) and precision != "fp16":
                raise UserError(f"the loss became {step_loss} at step {step}; lower --lr (now {cfg.lr}), keep "
                                f"--max-grad-norm on, or check the training rows")
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = None
            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            last_loss = step_loss
            window.append(step_loss)
            if main:
                rec = {"step": step, "loss": step_loss, "lr": lr}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                # the task's own metrics are rank 0's (local); they never replace the global loss
                rec.update({k: v / cfg.grad_accum for k, v in metric_sums.items() if k not in rec})
                log_file.write(json.dumps(rec) + "\n")
                if step % cfg.log_every == 0 or step == stop:
                    log_file.flush()
                    if writer is not None:
                        for k, v in rec.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg.save_every and step % cfg.save_every == 0 or step == stop:
                if main and (cfg.save_every or step < max_steps):
                    saved.append(str(save_checkpoint(cfg, step, module, optimizer, scheduler, scaler, sampler, inputs)))
                if world > 1:
                    import torch.distributed as dist

                    dist.barrier()
    finally:
        rows.close()
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()

    finished = stop >= max_steps
    if main and finished:
        with _no_hf_bars():
            save_model(task, module, cfg.output_dir)
        with atomic_path(out / TRAINING_ARGS) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**cfg.to_json(), "max_steps_resolved": max_steps, "warmup_steps_resolved": warmup,
                           "precision_resolved": precision, "rows": len(rows), "steps_per_epoch": per_epoch},
                          f, indent=2, default=str)
    if not main:
        return {}
    return {"step": max(start, stop), "max_steps": max_steps, "finished": finished, "final_loss": last_loss,
            "mean_loss_last_window": (sum(window[-cfg.log_every:]) / len(window[-cfg.log_every:])) if window else None,
            "resumed_from": str(resumed) if resumed else None, "checkpoints": saved,
            "output_dir": os.path.abspath(cfg.output_dir), "loss_log": str(out / LOSS_LOG), "rows": len(rows),
            "num_workers": world, "precision": precision, "device": str(device), "elapsed_s": time.time() - t0}


def _open_loss_log(path: Path, start: int):
    """The loss log opened for appending, cut back to the steps <= ``start`` (a resumed run rewrites the rest)."""
    kept = []
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                    if json.loads(line)["step"] <= start:
                        kept.append(line if line.endswith("\n") else line + "\n")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return open(path, "a", encoding="utf-8")


# ====================================================================== entry points


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.task`` as :class:`TrainConfig` says; return a summary (steps, last loss, paths).

    ``num_workers == 1`` (and no ``address``) runs in this process; otherwise Ray Train runs
    ``num_workers`` data-parallel workers (gloo on CPU, NCCL on GPU) on a running Ray session, the cluster at
    ``address``, or a local Ray started here (and stopped at the end).
    """
    check_config(cfg)
    cfg = absolute_paths(cfg)
    if cfg.num_workers == 1 and not cfg.address:
        import torch

        if cfg.device:
            device = torch.device(cfg.device)
        else:
            cuda = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
            if cuda and not torch.cuda.is_available():
                raise UserError("use_gpu was asked for but CUDA is not available here")
            device = torch.device("cuda" if cuda else "cpu")
        return _train_loop(cfg, 0, 1, device)
    return _train_ray(cfg, _train_loop)



def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every path resolved where the user gave it (this process's working directory): Ray Train
    workers run elsewhere (another directory, another node), where a relative path would name another file or
    none. The output directory and TensorBoard directory need not exist yet; models and tokenizers stay hub
    ids when no such local path exists."""
    def absolute(p):
        return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) else p

    options = cfg.options.replace(**{k: _local_path(getattr(cfg.options, k))
                                     for k in ("model", "model_config", "tokenizer", "document_model")
                                     if getattr(cfg.options, k) is not None})
    return dataclasses.replace(cfg, train_file=absolute(cfg.train_file), output_dir=absolute(cfg.output_dir),
                               tensorboard=absolute(cfg.tensorboard), options=options,
                               resume=cfg.resume if cfg.resume in (None, "latest") else absolute(cfg.resume))
