"""Ray Train data-parallel runs of the training loop (:mod:`embedder.trainer`): ``num_workers`` workers (gloo
on CPU, NCCL on GPU) on a running Ray session, the cluster at ``address``, or a local Ray started here (and
stopped at the end); and :class:`Gather`, the all-gather the workers' losses use for in-batch examples.

The loop itself is passed in (``loop(cfg, rank, world, device)``, the trainer's ``_train_loop``), so this
module never imports the trainer. Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import uuid
from typing import TYPE_CHECKING, Callable

from embedder.errors import UserError

if TYPE_CHECKING:
    from embedder.trainer import TrainConfig


class Gather:
    """``gather(t)``: the concatenation (dim 0, rank order) of ``t`` [n, ...] from every worker (workers may
    hold different n); backward all-reduces (sums) the gradient of the result and returns the local rows'
    slice, so each worker's rows get the gradient of every worker's loss. With DDP's gradient averaging the
    update is then the one-worker update of the whole global batch. ``rank``/``world_size`` are attributes
    (the losses read ``gather.rank``)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, t):
        from embedder.losses import gather_with_grad

        return gather_with_grad(t)


PROBE = ".shared-probe-{}"   # written into --output-dir by the driver; every worker must see it


def check_shared_paths(cfg: TrainConfig, probe: str, where: str) -> None:
    """What a worker on node ``where`` must see as the driver does (:class:`UserError` otherwise): the
    output directory (the driver's ``probe`` file in it: rank 0 writes checkpoints and the model there, every
    rank reads a checkpoint it resumes from), the training file, and every local model or tokenizer path
    (absolute by then: :func:`embedder.trainer.absolute_paths`; hub ids are not paths)."""
    fix = ("a cluster's training workers run on several nodes: put it on a filesystem every node mounts at the same "
           "path (NFS, a shared volume), or train with --num-workers on one node")
    if not os.path.exists(os.path.join(cfg.output_dir, probe)):
        raise UserError(f"--output-dir {cfg.output_dir} on node {where} is not the directory the command made (its "
                        f"check file is missing there); {fix}")
    paths = [("--train-file", cfg.train_file)] + [
        (f"--{k.replace('_', '-')}", getattr(cfg.options, k, None))
        for k in ("model", "model_config", "tokenizer", "document_model")]
    for flag, value in paths:
        if isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value):
            raise UserError(f"{flag} {value}: not found on node {where}; {fix}")


def _ray_worker(config: dict):
    """One Ray Train worker: ``config["loop"]`` on this worker's rank and device, once it sees the paths the
    driver does (:func:`check_shared_paths`)."""
    import ray
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: TrainConfig = config["cfg"]
    check_shared_paths(cfg, config["probe"], ray.util.get_node_ip_address())
    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    summary = config["loop"](cfg, rank, world, device)
    return summary if rank == 0 else None   # Result.return_value: rank 0's return value


def _train_ray(cfg: TrainConfig, loop: Callable[..., dict]) -> dict:
    """Run ``loop(cfg, rank, world, device)`` on ``cfg.num_workers`` Ray Train workers; rank 0's summary. A
    worker's :class:`UserError` is raised here again as one."""
    import ray

    from embedder.ray_session import ensure_ray

    started = not ray.is_initialized()   # a Ray this call starts (or joins) is left again at the end
    ensure_ray(cfg.address, num_cpus=max(os.cpu_count() or 1, cfg.num_workers), object_store_memory=200 * 1024**2)
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        use_gpu = cfg.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        have = ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0)
        if have < cfg.num_workers:
            raise UserError(f"--num-workers {cfg.num_workers}: the Ray cluster has {have:g} "
                            f"{'GPU' if use_gpu else 'CPU'}s, fewer than one per worker; use fewer workers or a "
                            f"bigger cluster")
        cfg = dataclasses.replace(cfg, use_gpu=use_gpu, progress=cfg.progress)
        out = os.path.abspath(cfg.output_dir)
        os.makedirs(out, exist_ok=True)
        probe = PROBE.format(uuid.uuid4().hex)
        with open(os.path.join(out, probe), "w"):
            pass
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"cfg": cfg, "loop": loop, "probe": probe},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}),
            run_config=RunConfig(name=f"train-{cfg.task_name()}-{os.getpid()}-{int(time.time())}",
                                 storage_path=os.path.join(out, ".ray_train"),
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            result = _interruptible(trainer.fit)
        except Exception as e:  # noqa: BLE001 - a worker's UserError becomes ours again
            user = _find_user_error(e)
            if user is not None:
                raise UserError(str(user)) from None
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, probe))
        summary = getattr(result, "return_value", None) or {}
        shutil.rmtree(os.path.join(out, ".ray_train"), ignore_errors=True)
        return summary
    finally:
        if started:
            ray.shutdown()


def _interruptible(fn):
    """``fn()`` in a thread while this (main) thread waits in short joins: Ray Train's fit blocks in a
    ``ray.get`` that never runs the command's SIGTERM handler, so a stop would wait for the whole run. Here
    the handler's exception comes out at once; the caller's ``ray.shutdown`` then ends the workers."""
    import threading

    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            box["error"] = e

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _find_user_error(e: BaseException, depth: int = 0) -> BaseException | None:
    if e is None or depth > 8:
        return None
    if isinstance(e, UserError):
        return e
    candidates = list(getattr(e, "worker_failures", {}).values()) if hasattr(e, "worker_failures") else []
    candidates += [getattr(e, "_base_exc", None), getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    for c in candidates:
        if isinstance(c, BaseException):
            found = _find_user_error(c, depth + 1)
            if found is not None:
                return found
    return None
