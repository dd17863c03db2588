"""Ray Train data-parallel runs of the training loop (:mod:`embedder.trainer`): ``num_workers`` workers (gloo
on CPU, NCCL on GPU) on a running Ray session, the cluster at ``address``, or a local Ray started here (and
stopped at the end); and :class:`Gather`, the all-gather the workers' losses use for in-batch examples.

The loop itself is passed in (``loop(cfg, rank, world, device)``, the trainer's ``_train_loop``), so this
module never imports the trainer. Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
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


def _ray_worker(config: dict):
    """One Ray Train worker: ``config["loop"]`` on this worker's rank and device."""
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: TrainConfig = config["cfg"]
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
        trainer = TorchTrainer(
            _ray_worker, train_loop_config={"cfg": cfg, "loop": loop},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}),
            run_config=RunConfig(name=f"train-{cfg.task_name()}-{os.getpid()}-{int(time.time())}",
                                 storage_path=os.path.join(out, ".ray_train"),
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - a worker's UserError becomes ours again
            user = _find_user_error(e)
            if user is not None:
                raise UserError(str(user)) from None
            raise
        summary = getattr(result, "return_value", None) or {}
        shutil.rmtree(os.path.join(out, ".ray_train"), ignore_errors=True)
        return summary
    finally:
        if started:
            ray.shutdown()


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
