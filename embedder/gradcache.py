"""Gradient accumulation that keeps a whole-batch loss: gradient caching (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", the GradCache method).

A loss over in-batch negatives couples every row of the batch, so summing the losses of micro-batches is not the
loss of the batch: each micro-batch would see only its own negatives. For a task with ``caches_gradients``
(:class:`embedder.tasks.base.Task`) one accumulated step is instead:

1. the model embeds the batch in ``parts`` pieces without gradients (torch's RNG state is kept before each);
2. the loss is taken over all the pieces' outputs at once, and its gradient with respect to those outputs;
3. each piece runs again, from the RNG state its first run had (the same dropout masks), and back-propagates
   its slice of that gradient (outputs of 0 dimensions, e.g. a learnable temperature, the same in every piece:
   with the last piece).

The gradient is the whole batch's; the memory is one piece's activations plus the outputs (each piece runs
twice: about a third more compute).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


def _rng_state(device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(task, module, batch: dict[str, Any], parts: int, *, gather=None,
                    autocast: Callable[[], Any] = contextlib.nullcontext,
                    no_sync: Callable[[], Any] = contextlib.nullcontext,
                    scale: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                    device=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Back-propagate ``task``'s loss over the whole ``batch`` with ``parts`` pieces in memory at a time; return
    (loss, metrics) as ``task.loss`` would. ``module`` may be DistributedDataParallel: every piece but the last
    runs under ``no_sync()`` (gradients are reduced once, with the last). ``scale`` is applied to what is
    back-propagated (a GradScaler's ``scale``)."""
    device = device or torch.device("cpu")
    pieces = task.split_inputs(task.model_inputs(batch), parts)
    inner = getattr(module, "module", module)
    states, outputs = [], []
    with torch.no_grad():
        for piece in pieces:
            states.append(_rng_state(device))
            with autocast():
                outputs.append(tuple(inner(**piece)))
    whole = []
    for j, first in enumerate(outputs[0]):
        x = first if first.ndim == 0 else torch.cat([o[j] for o in outputs])
        whole.append(x.detach().requires_grad_(x.is_floating_point()))
    loss, metrics = task.loss_from_outputs(tuple(whole), batch, gather)
    wanted = [x for x in whole if x.requires_grad]
    grads = dict(zip(map(id, wanted), torch.autograd.grad(loss, wanted, allow_unused=True)))
    after = _rng_state(device)
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        _set_rng_state(states[i], device)
        with no_sync() if not last else contextlib.nullcontext():
            with autocast():
                out = module(**piece)
            surrogate = None
            for j, y in enumerate(out):
                g = grads.get(id(whole[j]))
                if g is None or (y.ndim == 0 and not last):
                    continue
                if y.ndim > 0:
                    start = sum(o[j].shape[0] for o in outputs[:i])
                    g = g[start:start + y.shape[0]]
                term = (y.float() * g.float()).sum()
                surrogate = term if surrogate is None else surrogate + term
            if surrogate is not None:
                scale(surrogate).backward()
    _set_rng_state(after, device)
    return loss, metrics
