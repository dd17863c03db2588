"""Contrastive training: losses against hand computations, pair-row JSONL checking, the no-duplicate batch
sampler, retrieval metrics and negative mining, and the contrastive task on a tiny BERT."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedder import Encoder, UserError
from embedder.data import NoDuplicateBatchSampler, RowFile, doc_key, pair_row, pair_row_json, read_rows
from embedder.evaluate import evaluate, mine_negatives, search
from embedder.losses import Temperature, gather_with_grad, info_nce, margin_loss, matryoshka, pairwise_logistic
from embedder.tasks import get_task
from embedder.tasks.base import TaskOptions
from embedder.tasks.contrastive import ContrastiveTask, text_key


def _unit(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return F.normalize(x, dim=-1)


def _np_info_nce(q, cands, labels, t, excluded=None):
    """-mean log softmax(q @ cands.T / t)[label], written out in numpy."""
    logits = q @ cands.T / t
    if excluded is not None:
        logits = np.where(excluded, -np.inf, logits)
    m = logits.max(axis=1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    return -np.mean(log_softmax[np.arange(len(q)), labels])


# ---------------------------------------------------------------------- InfoNCE


def test_info_nce_by_hand_with_and_without_hard_negatives():
    q, d, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(3, 8, seed=3)
    t = 0.07
    got = info_nce(q, d, t)
    assert float(got) == pytest.approx(_np_info_nce(q.numpy(), d.numpy(), np.arange(4), t), rel=1e-10)
    got = info_nce(q, d, t, hard_negatives=n)
    want = _np_info_nce(q.numpy(), np.concatenate([d.numpy(), n.numpy()]), np.arange(4), t)
    assert float(got) == pytest.approx(want, rel=1e-10)
    # [B, K, D] hard negatives are the same flat set
    n2 = _unit(4, 2, 8, seed=4)
    want = _np_info_nce(q.numpy(), np.concatenate([d.numpy(), n2.reshape(8, 8).numpy()]), np.arange(4), t)
    assert float(info_nce(q, d, t, hard_negatives=n2)) == pytest.approx(want, rel=1e-10)


def test_info_nce_keys_exclude_copies_of_a_positive():
    """A candidate whose key is one of the query's positives (other than its label) leaves the softmax."""
    q, d, n = _unit(3, 6, seed=5), _unit(3, 6, seed=6), _unit(2, 6, seed=7)
    doc_keys = torch.tensor([10, 11, 12])
    neg_keys = torch.tensor([13, 11])              # negative 1 is a copy of row 1's positive
    pos_keys = torch.tensor([[10, 12], [11, -1], [12, -1]])   # row 0 also has doc 2 as a positive
    got = info_nce(q, d, 0.1, n, pos_keys=pos_keys, doc_keys=doc_keys, neg_keys=neg_keys)
    excluded = np.zeros((3, 5), bool)
    excluded[0, 2] = True     # row 0: doc 2 is its positive too
    excluded[1, 4] = True     # row 1: negative 1 is its own positive
    want = _np_info_nce(q.numpy(), np.concatenate([d.numpy(), n.numpy()]), np.arange(3), 0.1, excluded)
    assert float(got) == pytest.approx(want, rel=1e-10)


class FakeWorld:
    """W 'workers' as threads; ``gather(rank)`` all-gathers along dim 0 with autograd through torch.cat, as
    :func:`gather_with_grad` does across processes (a worker's rows receive every worker's gradient)."""

    def __init__(self, world: int):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def gather(self, rank: int):
        def g(x):
            self.slots[rank] = x
            self.barrier.wait()
            out = torch.cat(list(self.slots))
            self.barrier.wait()
            return out
        g.rank = rank
        return g

    def run(self, fn):
        results, errors = [None] * self.world, []

        def target(r):
            try:
                results[r] = fn(r, self.gather(r))
            except BaseException as e:  # pragma: no cover - surfaced below
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("sizes", [(3, 3), (3, 2)])
def test_info_nce_gather_offsets_labels_by_rank(sizes):
    """Worker r's query i has global candidate rank*B + i (the preceding workers' counts when they differ);
    the candidates are all workers' positives, then all workers' hard negatives."""
    D, t = 5, 0.05
    qs = [_unit(b, D, seed=10 + r).requires_grad_() for r, b in enumerate(sizes)]
    ds = [_unit(b, D, seed=20 + r).requires_grad_() for r, b in enumerate(sizes)]
    ns = [_unit(2, D, seed=30 + r).requires_grad_() for r in range(2)]
    losses = FakeWorld(2).run(lambda r, g: info_nce(qs[r], ds[r], t, ns[r], gather=g))
    cands = torch.cat(ds + ns).detach().numpy()
    for r, b in enumerate(sizes):
        offset = sum(sizes[:r])
        want = _np_info_nce(qs[r].detach().numpy(), cands, offset + np.arange(b), t)
        assert float(losses[r].detach()) == pytest.approx(want, rel=1e-10)
    # equal batches: the mean of the workers' losses is the one-worker loss over the whole batch, and so are
    # its gradients (each worker's rows get the gradient of both workers' losses)
    if sizes[0] == sizes[1]:
        (sum(losses) / 2).backward()
        leaves = [x.detach().clone().requires_grad_() for x in (torch.cat(qs), torch.cat(ds), torch.cat(ns))]
        one = info_nce(leaves[0], leaves[1], t, leaves[2])
        assert float(one.detach()) == pytest.approx(float(sum(losses).detach() / 2), rel=1e-10)
        one.backward()
        for parts, leaf in zip((qs, ds, ns), leaves):
            torch.testing.assert_close(torch.cat([p.grad for p in parts]), leaf.grad)


def _gloo_worker(rank, world, init_file, q, d, n, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        B = q.shape[0] // world
        sl = slice(rank * B, (rank + 1) * B)
        lq, ld, ln = (x[sl].clone().requires_grad_() for x in (q, d, n))
        loss = info_nce(lq, ld, 0.05, ln, gather=gather_with_grad)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [lq.grad, ld.grad, ln.grad]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_two_processes_equal_one(tmp_path):
    """Real torch.distributed (gloo, 2 processes): each worker's loss is its part of the one-worker loss, and
    its gradient is W times the one-worker gradient of its rows (data-parallel averaging divides by W)."""
    import torch.multiprocessing as mp

    world, B, D = 2, 3, 4
    q, d, n = _unit(world * B, D, seed=40).float(), _unit(world * B, D, seed=41).float(), \
        _unit(world * B, D, seed=42).float()
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), q, d, n, str(tmp_path / "out")), nprocs=world)
    results = [torch.load(f"{tmp_path / 'out'}.{r}") for r in range(world)]
    leaves = [x.clone().requires_grad_() for x in (q, d, n)]
    one = info_nce(*leaves[:2], 0.05, leaves[2])
    one.backward()
    assert float(sum(r["loss"] for r in results) / world) == pytest.approx(float(one.detach()), rel=1e-5)
    for rank, res in enumerate(results):
        for got, leaf in zip(res["grads"], leaves):
            torch.testing.assert_close(got, world * leaf.grad[rank * B:(rank + 1) * B], rtol=1e-4, atol=1e-6)


def test_gather_with_grad_is_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_learnable_temperature_has_a_gradient_and_is_clamped():
    q, d = _unit(4, 6, seed=50).float(), _unit(4, 6, seed=51).float()
    temp = Temperature(0.05)
    assert float(temp().detach()) == pytest.approx(0.05)
    info_nce(q, d, temp).backward()
    assert temp.log_inv.grad is not None and float(temp.log_inv.grad) != 0.0
    with torch.no_grad():
        temp.log_inv.fill_(math.log(1e6))
    assert float(temp().detach()) == pytest.approx(1e-3)
    temp.log_inv.grad = None
    info_nce(q, d, temp).backward()
    assert float(temp.log_inv.grad) == 0.0


# ---------------------------------------------------------------------- pairwise losses, matryoshka


def test_margin_and_logistic_by_hand_with_row_negatives():
    q, d, n = _unit(3, 5, seed=60), _unit(3, 5, seed=61), _unit(3, 2, 5, seed=62)
    qn, dn, nn = q.numpy(), d.numpy(), n.numpy()
    s_pos = (qn * dn).sum(1)                                  # [3]
    s_neg = np.einsum("bd,bkd->bk", qn, nn)                   # [3, 2]
    want = np.mean(np.maximum(0.0, 0.3 - s_pos[:, None] + s_neg).mean(axis=1))
    assert float(margin_loss(q, d, 0.3, n)) == pytest.approx(want, rel=1e-10)
    want = np.mean(np.log1p(np.exp(-(s_pos[:, None] - s_neg) / 0.1)).mean(axis=1))
    assert float(pairwise_logistic(q, d, 0.1, n)) == pytest.approx(want, rel=1e-10)


def test_margin_and_logistic_by_hand_with_in_batch_negatives():
    """Without hard negatives a query's negatives are the other rows' positives."""
    q, d = _unit(4, 5, seed=63), _unit(4, 5, seed=64)
    s = q.numpy() @ d.numpy().T
    off = ~np.eye(4, dtype=bool)
    hinge = np.maximum(0.0, 0.5 - np.diag(s)[:, None] + s)
    want = np.mean([hinge[i][off[i]].mean() for i in range(4)])
    assert float(margin_loss(q, d, 0.5)) == pytest.approx(want, rel=1e-10)
    logistic = np.log1p(np.exp(-(np.diag(s)[:, None] - s) / 0.2))
    want = np.mean([logistic[i][off[i]].mean() for i in range(4)])
    assert float(pairwise_logistic(q, d, 0.2)) == pytest.approx(want, rel=1e-10)


def test_margin_mixed_rows_use_own_negatives_or_in_batch():
    """neg_index [B, K] into [positives; negatives]: row 0 has negative 0 and row 2's positive, row 1 none
    (so in-batch documents 0 and 2), row 2 has negative 1."""
    q, d, n = _unit(3, 4, seed=65), _unit(3, 4, seed=66), _unit(2, 4, seed=67)
    neg_index = torch.tensor([[3, 2], [-1, -1], [4, -1]])
    s = q.numpy() @ np.concatenate([d.numpy(), n.numpy()]).T     # [3, 5]
    h = np.maximum(0.0, 0.2 - np.diag(s[:, :3])[:, None] + s)
    want = np.mean([h[0, [3, 2]].mean(), h[1, [0, 2, 3, 4]].mean(), h[2, [4]].mean()])
    assert float(margin_loss(q, d, 0.2, n, neg_index=neg_index)) == pytest.approx(want, rel=1e-10)


def test_matryoshka_averages_renormalised_truncations():
    q, d, n = _unit(4, 8, seed=70), _unit(4, 8, seed=71), _unit(2, 8, seed=72)
    fn = lambda a, b, hard_negatives=None: info_nce(a, b, 0.1, hard_negatives)  # noqa: E731
    got = matryoshka(fn, q, d, [2, 4, 8], hard_negatives=n)
    want = np.mean([_np_info_nce(F.normalize(q[:, :m], dim=-1).numpy(),
                                 F.normalize(torch.cat([d, n])[:, :m], dim=-1).numpy(), np.arange(4), 0.1)
                    for m in (2, 4, 8)])
    assert float(got) == pytest.approx(want, rel=1e-10)
    assert float(matryoshka(fn, q, d, [8], hard_negatives=n)) == pytest.approx(float(fn(q, d, n)), rel=1e-12)
    with pytest.raises(ValueError, match="not in 1..8"):
        matryoshka(fn, q, d, [16])


# ---------------------------------------------------------------------- JSONL rows


def _write(tmp_path, lines, name="train.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "pos": "p"', "not a JSON object (Expecting ',' delimiter"),
    ('["query", "pos"]', "not a JSON object (got an array)"),
    ('"just text"', "not a JSON object (got a string)"),
    ('{"pos": "p"}', "no 'query'"),
    ('{"query": 3, "pos": "p"}', "'query' must be a non-empty string, got a number"),
    ('{"query": "  ", "pos": "p"}', "'query' must be a non-empty string, got an empty string"),
    ('{"query": "q"}', "no positive"),
    ('{"query": "q", "neg": ["n"]}', "no positive"),
    ('{"query": "q", "pos": []}', "'pos' must be a non-empty string or a non-empty list"),
    ('{"query": "q", "doc": {"text": "p"}}', "'doc' must be a non-empty string or a non-empty list"),
    ('{"query": "q", "pos": "p", "doc": "p"}', "the positive is given twice ('pos' and 'doc')"),
    ('{"query": "q", "pos": "p", "neg": 5}', "'neg' must be a string or a list of strings, got a number"),
    ('{"query": "q", "pos": "p", "neg": ["a", 1]}', "'neg' must be a string or a list of strings, got an array "
                                                    "holding a number"),
    ('{"query": "q", "pos": "p", "neg": {"a": 1}}', "'neg' must be a string or a list of strings, got an object"),
    ('{"query": "q", "pos": "p", "neg": [""]}', "'neg' holds an empty text"),
])
@pytest.mark.parametrize("reader", [read_rows, RowFile], ids=["read_rows", "RowFile"])
def test_bad_rows_name_file_and_line(tmp_path, line, message, reader):
    path = _write(tmp_path, ['{"query": "fine", "pos": "row"}', "", line])
    task = ContrastiveTask(TaskOptions())
    with pytest.raises(UserError) as e:
        reader(path, task)
    assert str(e.value).startswith(f"{path}:3: ")   # the blank line 2 counts
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    if "JSON object" in message:
        assert str(e.value).endswith("each line must be one JSON object")


@pytest.mark.parametrize("reader", [read_rows, RowFile], ids=["read_rows", "RowFile"])
def test_unreadable_and_empty_files(tmp_path, reader):
    with pytest.raises(UserError, match="cannot read training file .*missing.jsonl"):
        reader(str(tmp_path / "missing.jsonl"), None)
    with pytest.raises(UserError, match="holds no rows"):
        reader(_write(tmp_path, ["", "  "]), None)
    (tmp_path / "bin.jsonl").write_bytes(b'{"query": "\xff"}\n')
    with pytest.raises(UserError, match=r"bin.jsonl:1: not UTF-8"):
        reader(str(tmp_path / "bin.jsonl"), None)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read training file .*bad.jsonl.gz"):
        reader(str(tmp_path / "bad.jsonl.gz"), None)


def test_pair_rows_normalise(tmp_path):
    import gzip

    lines = ['{"query": "q1", "document": "d1", "extra": 1}',
             '{"query": "q2", "pos": ["p2", "p2b", "p2"], "neg": "n2"}',
             '{"query": "q3", "passage": "p3", "neg": ["n3", "p3", " n3 ", "m3"]}']
    p = tmp_path / "train.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\ufeff" + "\n".join(lines))
    rows = read_rows(str(p), get_task("contrastive")(TaskOptions()))
    assert rows == [
        {"query": "q1", "pos": "d1", "positives": ["d1"], "neg": []},
        {"query": "q2", "pos": "p2", "positives": ["p2", "p2b"], "neg": ["n2"]},
        {"query": "q3", "pos": "p3", "positives": ["p3"], "neg": ["n3", "m3"]},   # own positive, copies dropped
    ]
    for r in rows:
        assert pair_row(json.loads(json.dumps(pair_row_json(r))), "x") == r
        assert pair_row(r, "x") is r


# ---------------------------------------------------------------------- the batch sampler


def _check_epoch(sampler, groups, batches, drop_last):
    for b in batches:
        keys = [groups[i] for i in b]
        assert len(set(keys)) == len(keys), f"a group twice in {b}"
        assert 1 <= len(b) <= sampler.batch_size
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == sampler.batch_size for b in batches)
    else:
        assert sorted(flat) == list(range(len(groups)))


@pytest.mark.parametrize("gz", [False, True], ids=["jsonl", "gzip"])
def test_row_file_reads_back_what_read_rows_holds(tmp_path, gz):
    """RowFile (rows read back on demand) gives read_rows' rows, any order, and group hashes that are equal
    exactly where the task's batch-group keys are."""
    import gzip

    lines = ['{"query": "q1", "document": "d1"}', "", '{"query": "q2", "pos": ["p2", "p2b"], "neg": "n2"}',
             '{"query": "q3", "pos": " d1 "}', '{"query": "caf\u00e9", "pos": "\u00fcber", "neg": ["x", "y"]}']
    p = tmp_path / ("t.jsonl.gz" if gz else "t.jsonl")
    data = ("\ufeff" + "\n".join(lines) + "\n").encode("utf-8")
    p.write_bytes(gzip.compress(data) if gz else data)
    task = get_task("contrastive")(TaskOptions())
    want = read_rows(str(p), task)
    with RowFile(str(p), task) as rows:
        assert len(rows) == len(want) == 4
        assert [rows[i] for i in (3, 0, 2, 1, 0)] == [want[i] for i in (3, 0, 2, 1, 0)]
        keys = task.batch_groups(want)
        same = [[keys[i] == keys[j] for j in range(4)] for i in range(4)]
        assert [[rows.groups[i] == rows.groups[j] for j in range(4)] for i in range(4)] == same
        assert same[0][2] and not same[0][1]                 # "d1" and " d1 " are one document
    text_rows = RowFile(str(p), None)                        # no task: raw objects, no groups
    assert text_rows.groups is None and text_rows[1]["query"] == "q2"
    text_rows.close()


def test_sampler_without_groups_is_the_permutation_in_slices():
    for drop_last in (False, True):
        s = NoDuplicateBatchSampler(None, 7, seed=5, drop_last=drop_last, num_rows=40)
        perm = np.random.default_rng([5, 0]).permutation(40).tolist()
        want = [perm[i:i + 7] for i in range(0, 40, 7)]
        want = [b for b in want if len(b) == 7] if drop_last else want
        assert list(s.epoch_batches(0)) == want and len(s) == len(want)
        assert list(s) == want and s.epoch == 1


def test_sampler_never_repeats_a_group_and_covers_every_row():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 120))
        n_groups = int(rng.integers(1, n + 1))
        skew = rng.random() < 0.3     # one group holding a large share of the rows
        groups = [0 if skew and rng.random() < 0.5 else int(rng.integers(n_groups)) for _ in range(n)]
        bs = int(rng.integers(1, 12))
        drop_last = bool(rng.random() < 0.3)
        s = NoDuplicateBatchSampler([f"g{g}" for g in groups], bs, seed=trial, drop_last=drop_last)
        e0, e1 = list(s), list(s)
        _check_epoch(s, [f"g{g}" for g in groups], e0, drop_last)
        _check_epoch(s, [f"g{g}" for g in groups], e1, drop_last)
        again = NoDuplicateBatchSampler([f"g{g}" for g in groups], bs, seed=trial, drop_last=drop_last)
        assert again.epoch_batches(0) == e0 and again.epoch_batches(1) == e1
        if not drop_last and n > 2 * bs and len(set(groups)) == n:
            assert all(len(b) == bs for b in e0[:-1])     # no duplicates: only the last batch is short
    # distinct groups: the batches are just the permutation, and epochs differ
    s = NoDuplicateBatchSampler(list(range(50)), 8, seed=3)
    assert s.epoch_batches(0) != s.epoch_batches(1)
    assert [len(b) for b in s.epoch_batches(0)] == [8] * 6 + [2]


def test_sampler_defers_colliding_rows_to_later_batches():
    """Three copies of one group among distinct ones: each copy lands in a different batch."""
    groups = ["a", "a", "a", "b", "c", "d", "e", "f"]
    for seed in range(20):
        batches = NoDuplicateBatchSampler(groups, 4, seed=seed).epoch_batches(0)
        assert sum(len(b) for b in batches) == 8 and len(batches[0]) == 4
        assert sum(1 for b in batches if any(groups[i] == "a" for i in b)) == 3
    one_group = NoDuplicateBatchSampler(["x"] * 5, 3, seed=0)
    assert [len(b) for b in one_group.epoch_batches(0)] == [1] * 5
    assert NoDuplicateBatchSampler(["x"] * 5, 3, seed=0, drop_last=True).epoch_batches(0) == []


def test_sampler_resumes_mid_epoch_exactly():
    groups = [i % 7 for i in range(40)]
    full = NoDuplicateBatchSampler(groups, 5, seed=11)
    order = list(full) + list(full)                      # two whole epochs
    s = NoDuplicateBatchSampler(groups, 5, seed=11)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(s.state_dict()))
    assert state["epoch"] == 0 and state["position"] == 3
    resumed = NoDuplicateBatchSampler(groups, 5, seed=11)
    resumed.load_state_dict(state)
    assert head + list(resumed) + list(resumed) == order
    assert resumed.state_dict()["epoch"] == 2
    with pytest.raises(UserError, match="batch_size=5, this run 6"):
        NoDuplicateBatchSampler(groups, 6, seed=11).load_state_dict(state)
    with pytest.raises(UserError, match="num_rows"):
        NoDuplicateBatchSampler(groups[:-1], 5, seed=11).load_state_dict(state)


# ---------------------------------------------------------------------- evaluation and mining


class FakeEncoder:
    """``encode`` returns the vector given for each text (by doc_key)."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = {doc_key(k): np.asarray(v, dtype=np.float32) for k, v in vectors.items()}
        self.calls = 0

    def encode(self, texts, batch_size=64):
        self.calls += 1
        return np.stack([self.vectors[doc_key(t)] for t in texts])


def _ranked_query(order: list[int], n_docs: int) -> np.ndarray:
    """A query vector over one-hot documents that ranks them in ``order`` (first = best)."""
    w = np.zeros(n_docs)
    for rank, doc in enumerate(order):
        w[doc] = n_docs + 1 - rank
    return w


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_metrics_by_hand(backend):
    n_docs = 15
    docs = [f"doc {j}" for j in range(n_docs)]
    vectors = {t: np.eye(n_docs)[j] * (1 + j) for j, t in enumerate(docs)}   # norms differ: cosine is used
    others = [j for j in range(n_docs)]
    def order(*first, last=()):
        rest = [j for j in others if j not in first and j not in last]
        return list(first) + rest + list(last)
    vectors["A"] = _ranked_query(order(0), n_docs)                     # positive at rank 1
    vectors["B"] = _ranked_query(order(5, 6, 1), n_docs)               # rank 3
    vectors["C"] = _ranked_query(order(last=[2, 7, 8]), n_docs)        # rank 13
    vectors["D"] = _ranked_query(order(9, 3, 10, 11, 12, 4), n_docs)   # positives at ranks 2 and 6
    rows = [{"query": "A", "pos": "doc 0", "neg": docs[10:]},
            {"query": "B", "pos": "doc 1", "neg": ["doc 5", "doc  0"]},   # "doc  0" is doc 0 (spacing)
            {"query": "C", "doc": "doc 2", "neg": docs[5:10]},
            {"query": "D", "pos": "doc 3"},
            {"query": "D", "pos": ["doc 4"], "neg": "doc 13"}]            # same query: a second relevant doc
    got = evaluate(FakeEncoder(vectors), rows, backend=backend)
    ndcg_d = (1 / math.log2(3) + 1 / math.log2(7)) / (1 + 1 / math.log2(3))
    want = {"mrr@10": (1 + 1 / 3 + 0 + 1 / 2) / 4,
            "recall@1": (1 + 0 + 0 + 0) / 4,
            "recall@10": (1 + 1 + 0 + 1) / 4,
            "recall@100": 1.0,
            "ndcg@10": (1 + 1 / math.log2(4) + 0 + ndcg_d) / 4,
            "n_queries": 4, "n_documents": 15}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    got5 = evaluate(FakeEncoder(vectors), rows, k=5, backend=backend)
    assert set(got5) == {"mrr@5", "recall@1", "recall@5", "recall@100", "ndcg@5", "n_queries", "n_documents"}
    assert got5["recall@5"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_search_ties_by_corpus_order(backend):
    docs = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], dtype=np.float32)
    q = np.tile(np.array([[1, 0]], dtype=np.float32), (25, 1))   # 25 queries: faiss takes its BLAS path
    scores, ids = search(q, docs, 2, backend)
    assert ids.tolist() == [[0, 2]] * 25 and scores.tolist() == [[1, 1]] * 25
    assert search(q[:1], docs, 10, backend)[1].tolist() == [[0, 2, 3, 4, 1]]


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_mine_negatives_skips_positives(backend):
    e = np.eye(6)
    vectors = {"q1": e[0] + 0.9 * e[1] + 0.8 * e[2] + 0.7 * e[3], "q2": e[3] + 0.5 * e[4] + 0.2 * e[2],
               "p1": e[0], "p1 copy": e[1], "n1": e[2], "p2": e[3], "x": e[4], "y": e[5], "z": e[2]}
    rows = [{"query": "q1", "pos": "p1", "neg": ["y"]},
            {"query": "q1", "pos": ["p1  copy"]},        # same query: its positive is never a negative either
            {"query": "q2", "pos": "p2", "neg": ["n1", "x"]}]
    mined = mine_negatives(FakeEncoder(vectors), rows, k=2, corpus=["z", "p2"], backend=backend)
    # q1 ranks p1, p1 copy (positives), then n1 and z tie (z is after n1 in corpus order), then p2
    assert [r["neg"] for r in mined] == [["n1", "z"], ["n1", "z"], ["x", "n1"]]
    assert [r["query"] for r in mined] == ["q1", "q1", "q2"] and mined[1]["positives"] == ["p1  copy"]
    assert [r["neg"] for r in mine_negatives(FakeEncoder(vectors), rows, k=10, backend=backend)][2] == \
        ["x", "n1", "p1", "y", "p1  copy"]       # without the extra corpus: no z


# ---------------------------------------------------------------------- the task on a tiny BERT


ROWS = [
    {"query": "how do for loops work", "pos": "the for statement iterates over the items of a sequence",
     "neg": ["the while statement repeats while a condition is true", "import loads a module"]},
    {"query": "what does import do", "pos": "import finds a module and binds it to a name",
     "neg": ["the for statement iterates over the items of a sequence"]},   # another row's positive
    {"query": "raise an exception", "pos": "the raise statement raises an exception",
     "neg": ["import loads a module", "the try statement handles exceptions", "return leaves a function"]},
    {"query": "define a function", "pos": "def defines a function object"},
    {"query": "leave a function", "pos": "return leaves a function with a value",
     "neg": ["def defines a function object"]},
    {"query": "handle errors", "pos": "the try statement handles exceptions"},
]


def _task(tiny_bert_dir, **kw) -> ContrastiveTask:
    return ContrastiveTask(TaskOptions(model=tiny_bert_dir, max_length=32, **kw))


def test_collate_shares_negatives_and_indexes_them(tiny_bert_dir):
    task = _task(tiny_bert_dir)
    rows = [task.check_row(r, f"r:{i}") for i, r in enumerate(ROWS)]
    assert task.batch_groups(rows) == [doc_key(r["pos"]) for r in rows]
    b = task.collate(rows, np.random.default_rng(0))   # before build: tokenizer loaded on its own
    # flat negatives: each distinct text once, none equal to a batch positive
    negs = ["the while statement repeats while a condition is true", "import loads a module",
            "return leaves a function"]
    assert b["n_input_ids"].shape[0] == 3 and b["neg_keys"].tolist() == [text_key(t) for t in negs]
    B = 6
    assert b["neg_index"].tolist() == [[B + 0, B + 1, -1], [0, -1, -1], [B + 1, 5, B + 2], [-1, -1, -1],
                                       [3, -1, -1], [-1, -1, -1]]
    assert b["doc_keys"].tolist() == [text_key(r["pos"]) for r in rows]
    assert b["q_input_ids"].shape[0] == B and b["q_input_ids"].shape[1] <= 32
    capped = _task(tiny_bert_dir, num_negatives=1)
    c1 = capped.collate(rows, np.random.default_rng(5))
    c2 = capped.collate(rows, np.random.default_rng(5))
    assert (c1["neg_index"] >= 0).sum(1).tolist() == [1, 1, 1, 0, 1, 0]
    assert torch.equal(c1["neg_index"], c2["neg_index"])


def test_collate_merges_positives_of_the_same_query(tiny_bert_dir):
    task = _task(tiny_bert_dir)
    rows = [pair_row({"query": "q", "pos": ["a", "b"]}, "x"), pair_row({"query": "q", "pos": "c"}, "x"),
            pair_row({"query": "r", "pos": "b"}, "x")]
    keys = task.collate(rows, np.random.default_rng(0))["pos_keys"].tolist()
    a, b_, c = (text_key(t) for t in "abc")
    assert keys == [[a, b_, c], [a, b_, c], [b_, -1, -1]]


def _train(task, module, batch, steps=20, lr=3e-3):
    opt = torch.optim.AdamW(task.trainable(module), lr=lr)
    module.train()
    for _ in range(steps):
        loss, metrics = task.loss(module, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return metrics


def _eval_loss(task, module, batch):
    module.eval()
    with torch.no_grad():
        value = float(task.loss(module, batch)[0])
    module.train()
    return value


@pytest.mark.parametrize("kw", [{}, {"loss": "margin", "margin": 0.5}, {"loss": "logistic", "temperature": 0.1},
                                {"learnable_temperature": True, "temperature": 0.05, "matryoshka_dims": (8, 16)}],
                         ids=["infonce", "margin", "logistic", "learnable-matryoshka"])
def test_loss_decreases_with_adamw(tiny_bert_dir, kw):
    torch.manual_seed(0)
    task = _task(tiny_bert_dir, **kw)
    module = task.build("cpu")
    rows = [task.check_row(r, f"r:{i}") for i, r in enumerate(ROWS)]
    batch = task.collate(rows, np.random.default_rng(0))
    before = _eval_loss(task, module, batch)
    metrics = _train(task, module, batch)
    after = _eval_loss(task, module, batch)
    assert math.isfinite(before) and after < 0.7 * before, (before, after)
    assert set(metrics) == {"loss", "temperature", "accuracy"}
    if kw.get("learnable_temperature"):
        assert any(p is module.temperature.log_inv for p in task.trainable(module))
        assert metrics["temperature"] != pytest.approx(0.05, abs=1e-6)


def test_bad_options_and_dims(tiny_bert_dir):
    with pytest.raises(UserError, match="unknown contrastive loss 'cosine'"):
        _task(tiny_bert_dir, loss="cosine")
    with pytest.raises(UserError, match="exceed the encoder's dimension 32"):
        _task(tiny_bert_dir, matryoshka_dims=(16, 64)).build("cpu")


def test_save_then_load_gives_the_same_embeddings(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    task = _task(tiny_bert_dir, pooling="cls")
    module = task.build("cpu")
    rows = [task.check_row(r, f"r:{i}") for i, r in enumerate(ROWS)]
    _train(task, module, task.collate(rows, np.random.default_rng(0)), steps=3)
    task.save(module, str(tmp_path / "out"))
    loaded = Encoder.load(str(tmp_path / "out"), device="cpu")
    assert (loaded.pooling, loaded.normalize, loaded.max_length) == ("cls", False, module.encoder.max_length)
    texts = [r["query"] for r in ROWS] + [r["pos"] for r in ROWS]
    module.eval()
    np.testing.assert_allclose(loaded.encode(texts), module.encoder.encode(texts), rtol=0, atol=1e-6)
    # the trained encoder evaluates, and stays in train mode when it was
    module.train()
    metrics = evaluate(module.encoder, rows)
    assert module.encoder.training and metrics["n_queries"] == 6 and metrics["n_documents"] == 9


def test_packaged_minilm_keeps_its_pooling_and_normalize(tmp_path):
    task = ContrastiveTask(TaskOptions(model=None, max_length=16))
    module = task.build("cpu")
    assert (module.encoder.pooling, module.encoder.normalize) == ("mean", True)
    task.save(module, str(tmp_path / "m"))
    loaded = Encoder.load(str(tmp_path / "m"), device="cpu")
    assert (loaded.pooling, loaded.normalize, loaded.max_length) == ("mean", True, module.encoder.max_length)
    module.eval()
    texts = ["a query", "a longer document about something else entirely"]
    np.testing.assert_allclose(loaded.encode(texts), module.encoder.encode(texts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean-no-special", "cls"])
def test_training_forward_matches_encode(tiny_bert_dir, pooling):
    """The collated batch embeds as Encoder.encode does (same tokens, padding and special-token mask), and
    the loss is float32 under autocast."""
    task = _task(tiny_bert_dir, pooling=pooling)
    module = task.build("cpu").eval()
    rows = [task.check_row(r, f"r:{i}") for i, r in enumerate(ROWS)]
    batch = task.collate(rows, np.random.default_rng(0))
    with torch.no_grad():
        q, d, n, _ = module(**{k: v for k, v in batch.items() if k[:2] in ("q_", "d_", "n_")})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.loss(module, batch)
    want = module.encoder.encode([r["query"] for r in rows])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(q.numpy(), want, rtol=0, atol=1e-5)
    assert n.shape == (3, 32) and loss.dtype == torch.float32


# ---------------------------------------------------------------------- gradient accumulation


@pytest.fixture()
def no_dropout_bert(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(tmp_path / "nodrop")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "nodrop")
    return str(tmp_path / "nodrop")


@pytest.mark.parametrize("kw", [{}, {"learnable_temperature": True, "temperature": 0.05, "matryoshka_dims": (8,)},
                                {"loss": "margin"}], ids=["infonce", "learnable-matryoshka", "margin"])
def test_grad_accum_is_one_big_batch(tmp_path, no_dropout_bert, corpus_texts, kw):
    """`--grad-accum` embeds the batch in micro-batches but takes the loss over the whole batch (every row's
    in-batch and hard negatives as in one big batch), so losses and weights equal grad-accum 1's to float noise
    (no dropout: its masks depend on the micro-batch's shape)."""
    from embedder.trainer import TrainConfig, train

    words = " ".join(corpus_texts[:60]).split()
    rows = []
    for i in range(32):
        w = words[i * 23:i * 23 + 30]
        row = {"query": " ".join(w[:5]), "pos": " ".join(w[3:3 + 8 + i % 9])}
        if i % 3 == 0:                                   # some rows with hard negatives, of different counts
            row["neg"] = [" ".join(words[i * 7 + j * 11:i * 7 + j * 11 + 12]) for j in range(1 + i % 2)]
        rows.append(row)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for accum in (1, 2, 4):
        out = train(TrainConfig(task="contrastive", train_file=str(data), output_dir=str(tmp_path / f"a{accum}"),
                                options=TaskOptions(model=no_dropout_bert, max_length=32, **kw), lr=1e-3,
                                batch_size=16, grad_accum=accum, max_steps=3, warmup_steps=0, progress=False))
        with open(tmp_path / f"a{accum}" / "loss_log.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f]
        from safetensors.torch import load_file

        runs[accum] = (np.array(losses), load_file(f"{out['output_dir']}/model.safetensors"))
    l1, w1 = runs[1]
    assert len(l1) == 3 and l1[-1] < l1[0]
    for accum in (2, 4):
        la, wa = runs[accum]
        np.testing.assert_allclose(la, l1, rtol=1e-5, err_msg=f"grad-accum {accum}")
        diff = torch.cat([(wa[k] - w1[k]).abs().reshape(-1) for k in w1])
        # as test_trainer's accumulation test: AdamW moves a weight by ~lr whatever its gradient's size, so
        # summation order shows on the few weights whose gradient is near eps
        assert float(diff.max()) <= 5e-5 and float((diff > 1e-6).float().mean()) <= 1e-3, accum
