"""Contrastive losses over L2-normalised embeddings, with in-batch negatives gathered across workers.

Shapes: ``q`` [B, D] queries, ``d`` [B, D] their positives (row i of ``d`` is query i's positive),
``hard_negatives`` [M, D] (or [B, K, D], flattened) extra documents. Scores are dot products, i.e. cosines
when the inputs are normalised (the caller normalises; :func:`matryoshka` re-normalises its truncations).

The *candidates* of a batch are every worker's positives followed by every worker's hard negatives::

    candidates = [d of worker 0, ..., d of worker W-1, negatives of worker 0, ..., negatives of worker W-1]

so the positive of local query i is candidate ``offset + i``, ``offset`` = the number of queries of the
workers before this one (``rank * B`` when every worker has B). Each query's negatives are all the other
candidates, except the ones known to be copies of one of its positives: ``pos_keys`` [B, P] (int64 keys of
each query's positives, -1 padding), with ``doc_keys`` [B] and ``neg_keys`` [M] the keys of the local
candidates, marks them (they are left out of the softmax and of the pairwise losses).

Gathering: ``gather`` all-gathers a tensor along dim 0 across workers (None on one worker); see
:func:`gather_with_grad`. The worker's rank comes from ``rank=``, else ``gather.rank``, else
``torch.distributed``; the offsets from gathering the local counts, so workers may hold different B.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- temperature


class Temperature(torch.nn.Module):
    """A learnable softmax temperature, held as ``log(1/t)`` (CLIP's logit scale) and clamped to
    [``min_value``, ``max_value``] when read (the gradient is zero while it sits at a bound)."""

    def __init__(self, initial: float = 0.02, min_value: float = 1e-3, max_value: float = 1.0):
        super().__init__()
        if not 0 < min_value <= initial <= max_value:
            raise ValueError(f"temperature {initial} must be in [{min_value}, {max_value}]")
        self.log_inv = torch.nn.Parameter(torch.tensor(math.log(1.0 / initial), dtype=torch.float32))
        self.min_value, self.max_value = float(min_value), float(max_value)

    def forward(self) -> torch.Tensor:
        log_inv = self.log_inv.clamp(math.log(1.0 / self.max_value), math.log(1.0 / self.min_value))
        return torch.exp(-log_inv)


def _temperature(t) -> torch.Tensor | float:
    return t() if isinstance(t, torch.nn.Module) else t


# ---------------------------------------------------------------------- gathering


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 (workers may hold different counts). Backward sums the incoming gradient over
    workers and returns this worker's slice: each worker's rows get the gradient of *every* worker's loss."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        ctx.offset, ctx.n = sum(sizes[:rank]), x.shape[0]
        width = max(sizes)
        if width == 0:
            return x.new_zeros((0,) + tuple(x.shape[1:]))
        padded = x.contiguous()
        if x.shape[0] < width:
            padded = torch.cat([padded, x.new_zeros((width - x.shape[0],) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        parts[rank] = x  # the local rows are this worker's own values
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.offset:ctx.offset + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` [n, ...] of every worker concatenated in rank order ([sum n, ...]); ``x`` itself when
    torch.distributed is not initialised or has one worker.

    Gradients flow to the local rows (the local tensor is put back in its place), and backward all-reduces
    the gradient of the gathered tensor, so a worker's rows also receive the gradient of the other workers'
    losses (their queries score against them). With data-parallel gradient averaging, W workers of B rows
    therefore compute the gradient of the mean loss over all W*B queries: the same as one worker with the
    whole batch (to float rounding). Every worker must make the same gather calls in the same order (they
    are collectives), in forward and backward."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


gather_with_grad.rank = None  # read from torch.distributed


def _rank(gather, rank) -> int:
    if rank is not None:
        return int(rank)
    if getattr(gather, "rank", None) is not None:
        return int(gather.rank)
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _offset(gather: Gather, count: int, rank: int, device) -> torch.Tensor:
    """Rows held by the workers before ``rank`` (a 0-d tensor): the sum of the gathered local counts."""
    sizes = gather(torch.tensor([count], dtype=torch.long, device=device))
    return sizes[:rank].sum()


# ---------------------------------------------------------------------- scores over the batch


def _flat(hard_negatives, q) -> torch.Tensor:
    if hard_negatives is None:
        return q.new_zeros((0, q.shape[1]))
    return hard_negatives.reshape(-1, q.shape[1])


def batch_scores(q, d, hard_negatives=None, *, gather: Gather | None = None, rank: int | None = None,
                 pos_keys=None, doc_keys=None, neg_keys=None):
    """Scores of the local queries against every candidate (module docstring).

    Returns ``scores`` [B, N], ``labels`` [B] (the positive's candidate index), ``excluded`` [B, N] (True:
    a copy of one of the query's positives other than its label; None without keys), and ``neg_base``
    (0-d tensor: candidate index of this worker's first hard negative).
    """
    B = q.shape[0]
    n = _flat(hard_negatives, q)
    use_keys = pos_keys is not None
    if use_keys:
        doc_keys = doc_keys.to(q.device)
        neg_keys = (neg_keys if neg_keys is not None else torch.zeros(0, dtype=torch.long)).to(q.device)
        if neg_keys.shape[0] != n.shape[0] or doc_keys.shape[0] != B:
            raise ValueError("doc_keys / neg_keys must have one key per document / hard negative")
    if gather is None:
        d_all, n_all = d, n
        d_off = torch.zeros((), dtype=torch.long, device=q.device)
        n_off = d_off
        if use_keys:
            dk_all, nk_all = doc_keys, neg_keys
    else:
        r = _rank(gather, rank)
        d_all, n_all = gather(d), gather(n)
        d_off, n_off = _offset(gather, B, r, q.device), _offset(gather, n.shape[0], r, q.device)
        if use_keys:
            dk_all, nk_all = gather(doc_keys), gather(neg_keys)
    candidates = torch.cat([d_all, n_all]) if n_all.shape[0] else d_all
    scores = q @ candidates.T
    labels = torch.arange(B, device=q.device) + d_off
    excluded = None
    if use_keys:
        cand_keys = torch.cat([dk_all, nk_all])                                           # [N]
        pk = pos_keys.to(q.device)                                                         # [B, P]
        excluded = ((cand_keys[None, :, None] == pk[:, None, :]) & (pk[:, None, :] >= 0)).any(-1)
        excluded[torch.arange(B, device=q.device), labels] = False
    return scores, labels, excluded, d_all.shape[0] + n_off


# ---------------------------------------------------------------------- losses


def info_nce(q, d, temperature, hard_negatives=None, *, gather: Gather | None = None, rank: int | None = None,
             pos_keys=None, doc_keys=None, neg_keys=None, return_accuracy: bool = False):
    """InfoNCE (in-batch softmax cross-entropy): mean over local queries of
    ``-log softmax(scores / t)[positive]`` over all candidates (module docstring) not excluded by keys.
    ``temperature`` is a float, a 0-d tensor, or a :class:`Temperature`. With ``return_accuracy`` also the
    share of local queries whose positive scores highest (a float)."""
    scores, labels, excluded, _ = batch_scores(q, d, hard_negatives, gather=gather, rank=rank,
                                               pos_keys=pos_keys, doc_keys=doc_keys, neg_keys=neg_keys)
    logits = scores / _temperature(temperature)
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    if return_accuracy:
        return loss, float((logits.argmax(dim=1) == labels).float().mean())
    return loss


def _negative_mask(scores, labels, excluded, neg_index, neg_base, B) -> torch.Tensor:
    """[B, N] True where candidate c is a negative of query i for the pairwise losses: its own hard negatives
    (``neg_index`` [B, K] into the local [d; hard negatives], -1 padding) when the row has any, else every
    other candidate (in-batch negatives); never an excluded one."""
    inbatch = torch.ones_like(scores, dtype=torch.bool)
    inbatch[torch.arange(B, device=scores.device), labels] = False
    if neg_index is None:
        mask = inbatch
    else:
        neg_index = neg_index.to(scores.device)
        valid = neg_index >= 0
        # local candidate j < B is local document j -> global labels[0] + j; j >= B is local negative j - B
        glob = torch.where(neg_index < B, labels[0] + neg_index, neg_base + neg_index - B)
        own = torch.zeros_like(inbatch)
        rows = torch.arange(B, device=scores.device)[:, None].expand_as(neg_index)
        own[rows[valid], glob[valid]] = True
        own[torch.arange(B, device=scores.device), labels] = False
        mask = torch.where(valid.any(dim=1, keepdim=True), own, inbatch)
    if excluded is not None:
        mask = mask & ~excluded
    return mask


def _pairwise(per_pair: Callable, q, d, hard_negatives, neg_index, **kw):
    B = q.shape[0]
    if hard_negatives is not None and hard_negatives.dim() == 3 and neg_index is None:
        K = hard_negatives.shape[1]
        neg_index = B + torch.arange(B * K, device=q.device).reshape(B, K)
    scores, labels, excluded, neg_base = batch_scores(q, d, hard_negatives, **kw)
    mask = _negative_mask(scores, labels, excluded, neg_index, neg_base, B)
    s_pos = scores.gather(1, labels[:, None])                                     # [B, 1]
    values = per_pair(s_pos, scores) * mask                                       # [B, N]
    count = mask.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return scores.sum() * 0.0
    per_query = values.sum(dim=1)[has] / count[has]
    return per_query.mean()


def margin_loss(q, d, margin: float = 0.2, hard_negatives=None, *, neg_index=None, **kw):
    """Hinge on cosine, ``max(0, margin - s_pos + s_neg)``, averaged over each query's negatives, then over
    the queries that have any. A query's negatives are its own hard negatives when it has some
    (``hard_negatives`` [B, K, D], or [M, D] with ``neg_index`` [B, K]), else every other candidate of the
    batch (in-batch negatives, gathered like :func:`info_nce`; ``kw`` = gather, rank, keys)."""
    return _pairwise(lambda s_pos, s: F.relu(margin - s_pos + s), q, d, hard_negatives, neg_index, **kw)


def pairwise_logistic(q, d, temperature=0.05, hard_negatives=None, *, neg_index=None, **kw):
    """``log(1 + exp(-(s_pos - s_neg) / t))`` (RankNet), averaged like :func:`margin_loss`."""
    t = _temperature(temperature)
    return _pairwise(lambda s_pos, s: F.softplus(-(s_pos - s) / t), q, d, hard_negatives, neg_index, **kw)


def matryoshka(loss_fn: Callable, q, d, dims: Sequence[int], hard_negatives=None, **kw):
    """The mean of ``loss_fn(q', d', hard_negatives=n', **kw)`` over ``dims``, where ``x'`` is ``x`` truncated
    to its first m dimensions and L2-normalised again (Matryoshka representation learning). Include the full
    dimension in ``dims`` to train it too."""
    dims = list(dims)
    if not dims:
        raise ValueError("matryoshka needs at least one dimension")
    full = q.shape[-1]
    losses = []
    for m in dims:
        if not 1 <= int(m) <= full:
            raise ValueError(f"matryoshka dimension {m} is not in 1..{full}")
        cut = [None if x is None else F.normalize(x[..., :int(m)], dim=-1) for x in (q, d, hard_negatives)]
        losses.append(loss_fn(cut[0], cut[1], hard_negatives=cut[2], **kw))
    return torch.stack(losses).mean()
