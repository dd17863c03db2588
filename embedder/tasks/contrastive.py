"""Contrastive fine-tuning of the encoder on (query, positive[, hard negatives]) pair rows.

Rows: see :mod:`embedder.data` (``query`` + ``pos``/``document``/``doc``/``passage`` [+ ``neg``]). A batch
never holds two rows with the same positive (:meth:`ContrastiveTask.batch_groups` for the trainer's
:class:`embedder.data.NoDuplicateBatchSampler`), and the loss masks out every candidate that is a copy of one
of a query's positives (its own extra positives, positives of rows with the same query text, a hard negative
that is another row's positive, and the same across workers), so in-batch negatives are never false ones.

Hard negatives per batch: each row uses up to ``num_negatives`` of its own (all when None); a row with more
draws that many from the rng the trainer passes (kept in their given order), so epochs see different ones.
Rows do **not** need the same count: the batch's negatives are tokenized once as a flat list (a text shared by
rows, or equal to one of the batch's positives, appears once), and ``neg_index`` [B, K] (K = the largest
count, -1 padding) says which are whose. InfoNCE uses every negative of the batch for every query; the
pairwise losses use each row's own (in-batch documents for a row without any). Nothing is cycled or cut.

Loss (``options.loss``): ``infonce`` (temperature ``options.temperature``, learnable with
``options.learnable_temperature``), ``margin`` (``options.margin``) or ``logistic`` (temperature as for
InfoNCE), on L2-normalised embeddings; with ``options.matryoshka_dims`` the mean of the loss at the full
dimension and at each listed truncation. Texts are tokenized to ``options.max_length`` tokens, capped at the
encoder's own max_length. The saved encoder is the trained transformer with the pooling it was loaded with
(``options.pooling`` overrides) and the model's own normalize and max_length.

The trained module is :class:`embedder.tasks.models.ContrastiveModel`; this module imports no torch (its
methods load it).
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.data import doc_key, pair_row
from embedder.errors import UserError
from embedder.options import Option
from embedder.tasks.base import MAX_LENGTH, MODEL, POOLING, Task, TaskOptions

if TYPE_CHECKING:
    import torch

    from embedder.tasks.models import ContrastiveModel

LOSSES = ("infonce", "margin", "logistic")
PARTS = ("q", "d", "n")   # a batch's texts: queries, positives (documents), hard negatives


def _loss_name(value: str) -> str:
    if value not in LOSSES:
        raise UserError(f"unknown contrastive loss {value!r}; use one of {', '.join(LOSSES)}")
    return value


def _dims(value) -> tuple[int, ...]:
    """'384,256,128' (or a sequence of ints) -> (384, 256, 128)."""
    try:
        dims = tuple(int(x) for x in (value.split(",") if isinstance(value, str) else value) if str(x).strip())
    except (TypeError, ValueError):
        dims = None
    if dims is None or any(d < 1 for d in dims):
        raise UserError(f"--matryoshka-dims {value!r}: give positive integers separated by commas, e.g. 384,256,128")
    return dims


OPTIONS = (
    MODEL, MAX_LENGTH, POOLING,
    Option("temperature", float, 0.02, "Softmax temperature of the scores.", minimum=0, open_minimum=True),
    Option("learnable_temperature", bool, False, "Learn the temperature, starting at --temperature (at most 1)."),
    Option("loss", str, "infonce", "infonce (softmax over in-batch + hard negatives), margin (hinge on the score gap) "
           "or logistic (pairwise).", normalize=_loss_name),
    Option("margin", float, 0.2, "With --loss margin: the gap to enforce."),
    Option("matryoshka_dims", str, (), "Also train the first D dimensions as embeddings, e.g. 384,256,128.",
           normalize=_dims, shown_default="none"),
    Option("num_negatives", int, None, "Hard negatives used per query (drawn from the row's 'neg').", minimum=0,
           shown_default="all"),
)


def text_key(text: str) -> int:
    """A non-negative int64 key of a document (its :func:`embedder.data.doc_key`), for masking in the loss."""
    digest = hashlib.blake2b(doc_key(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _padded(tokenizer, texts: list[str], limit: int, part: str) -> dict[str, torch.Tensor]:
    """Texts tokenized to at most ``limit`` tokens and right-padded to the longest as
    :meth:`embedder.Encoder.encode_ids` pads (:func:`embedder.encoder.pad_right`: padding unattended and
    marked special), under ``{part}_input_ids`` / ``_attention_mask`` / ``_special_tokens_mask``."""
    import torch

    from embedder.encoder import pad_id, pad_right

    enc = tokenizer(texts, truncation=True, max_length=limit, padding=False, return_attention_mask=False,
                    return_token_type_ids=False, return_special_tokens_mask=True)
    arrays = pad_right(enc["input_ids"], pad_id(tokenizer), special=enc["special_tokens_mask"])
    return {f"{part}_{name}": torch.from_numpy(a)
            for name, a in zip(("input_ids", "attention_mask", "special_tokens_mask"), arrays)}


class ContrastiveTask(Task):
    name = "contrastive"
    summary = "fine-tune on query/positive pairs with in-batch (+ hard) negatives (rows {'query', 'pos'[, 'neg']})"
    row_kind = "pairs"
    OPTIONS = OPTIONS

    def __init__(self, options: TaskOptions | None = None):
        super().__init__(options)
        o = self.options
        if o.learnable_temperature and o.temperature > 1.0:
            raise UserError(f"a learnable temperature starts at most at 1.0, not {o.temperature}")

    # ------------------------------------------------------------------ model

    def build(self, device) -> ContrastiveModel:
        from embedder.encoder import Encoder
        from embedder.tasks.models import ContrastiveModel

        encoder = Encoder.load(self.options.model, pooling=self.options.pooling, device=device, option="--model")
        bad = [m for m in self.options.matryoshka_dims if m > encoder.dim]
        if bad:
            raise UserError(f"matryoshka dims {bad} exceed the encoder's dimension {encoder.dim}")
        self.use_tokenizer(encoder.tokenizer, encoder.max_length)
        module = ContrastiveModel(encoder, self.options.temperature, self.options.learnable_temperature)
        return module.to(device).train()

    # ------------------------------------------------------------------ data

    def check_row(self, row: dict, where: str) -> dict:
        return pair_row(row, where)

    def batch_groups(self, rows: list[dict]) -> list[Any]:
        return [doc_key(r["pos"]) for r in rows]

    def collate(self, rows: list[dict], rng: np.random.Generator) -> dict[str, Any]:
        """Tensors of a micro-batch: ``{q,d,n}_{input_ids,attention_mask,special_tokens_mask}`` (queries,
        positives, the flat list of hard negatives; the ``n_`` ones absent when there are none),
        ``neg_index`` [B, K] (into [positives; negatives], -1 padding), ``pos_keys`` [B, P], ``doc_keys``
        [B], ``neg_keys`` [M] (see :mod:`embedder.losses`)."""
        import torch

        tokenizer, limit = self.tokenizer_and_limit()
        B = len(rows)
        # every positive of every row with the same query text is a positive of each of them
        by_query: dict[str, list[int]] = {}
        for r in rows:
            keys = by_query.setdefault(r["query"], [])
            keys.extend(k for k in (text_key(p) for p in r["positives"]) if k not in keys)
        doc_keys = [text_key(r["pos"]) for r in rows]
        column = {k: j for j, k in enumerate(doc_keys)}   # a negative equal to a batch positive is that column
        neg_texts: list[str] = []
        neg_keys: list[int] = []
        flat_of: dict[int, int] = {}
        per_row: list[list[int]] = []
        cap = self.options.num_negatives
        for r in rows:
            negs = r["neg"]
            if cap is not None and len(negs) > cap:
                negs = [negs[i] for i in np.sort(rng.choice(len(negs), size=cap, replace=False))]
            idx = []
            for text in negs:
                k = text_key(text)
                if k in column:
                    idx.append(column[k])
                else:
                    if k not in flat_of:
                        flat_of[k] = len(neg_texts)
                        neg_texts.append(text)
                        neg_keys.append(k)
                    idx.append(B + flat_of[k])
            per_row.append(idx)
        K = max((len(i) for i in per_row), default=0)
        neg_index = torch.full((B, K), -1, dtype=torch.long)
        for i, idx in enumerate(per_row):
            neg_index[i, :len(idx)] = torch.tensor(idx, dtype=torch.long)
        P = max(len(v) for v in by_query.values())
        pos_keys = torch.full((B, P), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            keys = by_query[r["query"]]
            pos_keys[i, :len(keys)] = torch.tensor(keys, dtype=torch.long)
        batch: dict[str, Any] = {"neg_index": neg_index, "pos_keys": pos_keys,
                                 "doc_keys": torch.tensor(doc_keys, dtype=torch.long),
                                 "neg_keys": torch.tensor(neg_keys, dtype=torch.long)}
        for part, texts in (("q", [r["query"] for r in rows]), ("d", [r["pos"] for r in rows]), ("n", neg_texts)):
            if texts:
                batch.update(_padded(tokenizer, texts, limit, part))
        return batch

    # ------------------------------------------------------------------ objective

    caches_gradients = True   # in-batch negatives: --grad-accum embeds in pieces, the loss sees the whole batch

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k.split("_", 1)[0] in PARTS}

    def split_inputs(self, inputs: dict[str, Any], parts: int) -> list[dict[str, Any]]:
        """Queries, positives and negatives each cut into ``parts`` row ranges (every piece holds queries: the
        trainer's batch divides); each piece's tensors are cut to its own longest text."""
        pieces: list[dict[str, Any]] = [{} for _ in range(parts)]
        for part in PARTS:
            ids = inputs.get(f"{part}_input_ids")
            if ids is None:
                continue
            for piece, rows in zip(pieces, np.array_split(np.arange(ids.shape[0]), parts)):
                if len(rows) == 0:
                    continue
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                width = max(1, int(inputs[f"{part}_attention_mask"][lo:hi].sum(dim=1).max()))
                for name in ("input_ids", "attention_mask", "special_tokens_mask"):
                    key = f"{part}_{name}"
                    if key in inputs:
                        piece[key] = inputs[key][lo:hi, :width]
        return pieces

    def loss(self, module, batch: dict[str, Any], gather=None) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        inner = getattr(module, "module", module)
        device = inner.encoder.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.loss_from_outputs(module(**self.model_inputs(batch)), batch, gather)

    def loss_from_outputs(self, outputs: tuple, batch: dict[str, Any], gather=None) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        from embedder.losses import info_nce, margin_loss, matryoshka, pairwise_logistic

        q, d, n, t = outputs
        device = q.device
        keys = {"gather": gather, "pos_keys": batch["pos_keys"].to(device), "doc_keys": batch["doc_keys"].to(device),
                "neg_keys": batch["neg_keys"].to(device)}
        o = self.options
        neg_index = batch["neg_index"].to(device)
        if o.loss == "infonce":
            fn = partial(info_nce, temperature=t, **keys)
        elif o.loss == "margin":
            fn = partial(margin_loss, margin=o.margin, neg_index=neg_index, **keys)
        else:
            fn = partial(pairwise_logistic, temperature=t, neg_index=neg_index, **keys)
        dims = sorted(set(o.matryoshka_dims) | {q.shape[1]})
        hard = n if n.shape[0] else None
        # scores in float32 even under the trainer's autocast (cosines / 0.02 lose too much in fp16)
        with torch.autocast(device.type, enabled=False):
            q, d, t = q.float(), d.float(), t.float()
            hard = hard.float() if hard is not None else None
            loss = matryoshka(fn, q, d, dims, hard_negatives=hard) if len(dims) > 1 else \
                fn(q, d, hard_negatives=hard)
        with torch.no_grad():  # local in-batch accuracy: the positive outscores every local candidate
            cand = torch.cat([d, n]) if n.shape[0] else d
            accuracy = float((torch.argmax(q @ cand.T, dim=1) == torch.arange(q.shape[0], device=q.device))
                             .float().mean())
        return loss, {"loss": float(loss.detach()), "temperature": float(t.detach()), "accuracy": accuracy}

    # ------------------------------------------------------------------ result

    def save(self, module, output_dir: str) -> None:
        inner = getattr(module, "module", module)
        inner.encoder.save(output_dir)


TASK = ContrastiveTask
