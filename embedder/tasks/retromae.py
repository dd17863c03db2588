"""RetroMAE pre-training (Xiao et al. 2022, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via
Masked Auto-Encoder"), plus the parts the other pre-training tasks (retroar, custom, mlm) share.

Rows: ``text`` (see :func:`text_row`). Per text (tokenized with the model's tokenizer to
``options.max_length`` tokens, capped at the encoder's max_length):

- **Encoder**: the text masked at ``options.mask_ratio`` (0.3; :func:`embedder.masking.mask_tokens`: 80%
  [MASK], 10% a random token, 10% unchanged; [CLS]/[SEP]/[PAD] never masked), trained with masked-LM on its
  own masked positions. The MLM head is the checkpoint's own when it is a masked-LM checkpoint (its
  ``architectures`` say ``*ForMaskedLM`` / ``*ForPreTraining``), else a new ``AutoModelForMaskedLM``-style head
  built from the encoder's config (e.g. ``BertOnlyMLMHead``), its output matrix tied to the input embeddings.
  The sentence embedding is the [CLS] hidden state of the masked text (pooling ``cls``).
- **Enhanced decoder**: one transformer layer of the encoder's width (:class:`DecoderLayer`, a BERT layer
  whose queries and keys/values are two different streams), reconstructing the text from the sentence
  embedding. Query stream ``h1[i] = cls + p_i`` (the embedding repeated plus position embeddings); content
  stream ``h2 = [cls, e(x_1), ..., e(x_n)]`` (the encoder's embedding layer on the *unmasked* text, its
  position 0 replaced by the sentence embedding). Each row ``i`` attends to a random subset of ``h2``
  (:func:`embedder.masking.enhanced_decoding_mask`: position 0 always, never itself, never padding, each
  other text token hidden with probability ``options.decoder_mask_ratio`` = 0.5, drawn per row). The decoder
  predicts every text token (labels -100 only at [CLS]/[SEP]/special tokens and padding) with the same MLM
  head as the encoder.
- Loss = encoder MLM + decoder loss (token means, each over its own labelled positions).

As in the reference implementation (github.com/staoxiao/RetroMAE, ``src/pretrain/data.py`` and
``modeling.py``), the
decoder's "masking at a higher ratio" is done in its attention matrix, not in its input: the decoder input is
the original text and ``decoder_mask_ratio`` is the share of the other tokens each row cannot see (so no
[MASK] token enters the decoder, and every token has a label). Deviations from the reference: token-level
masking (not whole-word), an exact count per row for the encoder masking, and i.i.d. per-(row, position)
draws for the decoder matrix (the reference draws at most 256 whole-word masks per text and gives each row one
of them); for encoders without absolute position embeddings (RoPE: RoFormer, ModernBERT) the decoder has
its own learned position embeddings, added to both streams.

Only the encoder is saved (:meth:`embedder.Encoder.save`, pooling ``cls``, the model's own normalize
setting): ``Encoder.load(output_dir)`` and sentence-transformers load it as a plain encoder.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedder.errors import UserError, first_line
from embedder.masking import IGNORE, enhanced_decoding_mask, mask_tokens
from embedder.tasks.base import Task, TaskOptions

log = logging.getLogger(__name__)

TEXT_KEYS = ("text", "document", "doc", "passage", "pos")
_SPECIAL_ATTRS = ("cls", "sep", "pad", "bos", "eos", "mask")   # never masked, never a decoder label


# ====================================================================== rows and batches


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


def text_row(row: dict, where: str) -> dict:
    """A pre-training row -> ``{"text": str}``. The text is ``text``, or (so that a pairs file of
    :mod:`embedder.data` can be used for pre-training) ``document`` / ``doc`` / ``passage`` / ``pos``, the
    first of these a row has; a pair's ``pos`` may be a list, whose first entry (the row's positive) is taken.
    Other fields (a pair's ``query``, ``neg``) are ignored. The text must be a non-empty string; else a
    :class:`UserError` naming ``where``."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object with 'text', got {_json_type(row)}")
    given = [k for k in TEXT_KEYS if k in row]
    if not given:
        raise UserError(f"{where}: no 'text'; a pre-training row needs 'text' (or 'document', 'doc', "
                        f"'passage' or 'pos')")
    key = given[0]
    text = row[key]
    if key == "pos" and isinstance(text, list) and text:
        text = text[0]
    if not isinstance(text, str) or not text.strip():
        got = "an empty string" if isinstance(text, str) else _json_type(text)
        raise UserError(f"{where}: '{key}' must be a non-empty string, got {got}")
    return {"text": text}


def special_ids(tokenizer) -> np.ndarray:
    """Ids that are never masked and never a label: the tokenizer's [CLS]/[SEP]/[PAD]/BOS/EOS/[MASK] (not
    [UNK], which is a text token)."""
    ids = {getattr(tokenizer, f"{t}_token_id", None) for t in _SPECIAL_ATTRS}
    return np.array(sorted(i for i in ids if i is not None), dtype=np.int64)


def tokenize(tokenizer, texts: list[str], limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts -> right-padded (ids, attention, special) int64 arrays [B, L]; ``special`` is 1 at the tokens the
    tokenizer adds, at any special id inside a text, and at padding."""
    enc = tokenizer(list(texts), truncation=True, max_length=limit, padding=False, return_attention_mask=False,
                    return_token_type_ids=False, return_special_tokens_mask=True)
    rows, marks = enc["input_ids"], enc["special_tokens_mask"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fill = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad
    width = max(1, max(len(r) for r in rows))
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    special = np.ones((len(rows), width), dtype=np.int64)
    for i, (r, m) in enumerate(zip(rows, marks)):
        if not r:                     # a text the tokenizer turns into nothing (no post-processor): one [UNK]
            r, m = [fill], [0]
        ids[i, :len(r)] = r
        attention[i, :len(r)] = 1
        special[i, :len(r)] = m
    special |= np.isin(ids, special_ids(tokenizer)).astype(np.int64)
    return ids, attention, special


def check_ratio(name: str, value, low_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0)
    if not ok:
        raise UserError(f"{name}={value!r} must be a number {'>' if low_open else '>='} 0 and < 1")
    return float(value)


def need_mask_token(tokenizer, where: str) -> None:
    if tokenizer.mask_token_id is None:
        raise UserError(f"the tokenizer of {where} has no mask token ([MASK] or <mask>), which masked-LM "
                        f"training needs; use a tokenizer that has one (retro-pipeline train-tokenizer "
                        f"--kind wordpiece makes [MASK])")
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of {where} has no padding token ([PAD] or <pad>), which batching needs; "
                        f"use a tokenizer that has one (retro-pipeline train-tokenizer --kind wordpiece makes "
                        f"[PAD])")


def need_leading_special(tokenizer, where: str) -> None:
    """RetroMAE-style tasks read the sentence embedding at position 0: the tokenizer must put [CLS] (or BOS)
    there."""
    enc = tokenizer(["a"], return_special_tokens_mask=True)
    if not enc["input_ids"][0] or not enc["special_tokens_mask"][0][0]:
        raise UserError(f"the tokenizer of {where} does not start a text with a special token ([CLS] or <s>); "
                        f"the sentence embedding is the hidden state at that position, so use a tokenizer "
                        f"with a BERT-style post-processor ([CLS] text [SEP])")


def encoder_tokenizer(model: str | None):
    """(tokenizer, max_length) of an encoder as :meth:`embedder.Encoder.load` would give them, without the
    weights (for a collate that runs before or without :meth:`Task.build`)."""
    from transformers import AutoConfig, AutoTokenizer

    from embedder.settings import MODEL_FIX, check_model_dir, load_errors, read_settings, resolve_model

    name = resolve_model(model, "--model", MODEL_FIX)
    if os.path.exists(name):
        check_model_dir(name, "--model", MODEL_FIX)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
        positions = getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None)
    except load_errors() as e:
        raise UserError(f"cannot load the tokenizer of '{name}' ({first_line(e)})") from None
    limit = read_settings(name).get("max_length")
    if limit is None:
        limit = min(x for x in (tokenizer.model_max_length, positions, 512) if x is not None)
    return tokenizer, int(limit)


def masked_lm_batch(tokenizer, texts: list[str], limit: int, ratio: float, rng: np.random.Generator) -> dict:
    """The encoder half of a batch: ``input_ids`` (masked), ``attention_mask``, ``labels`` (-100 where not
    masked), plus the unmasked ``ids`` and ``special`` arrays for a decoder."""
    ids, attention, special = tokenize(tokenizer, texts, limit)
    inputs, labels = mask_tokens(ids, special, ratio, rng, tokenizer.mask_token_id, len(tokenizer))
    return {"input_ids": inputs, "attention_mask": attention, "labels": labels, "ids": ids, "special": special}


def reconstruction_labels(ids: np.ndarray, attention: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Every text token is a label; [CLS]/[SEP]/specials and padding are -100 (the reference's decoder labels)."""
    return np.where(attention.astype(bool) & ~special.astype(bool), ids, IGNORE)


def as_tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


# ====================================================================== model parts


def masked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``head`` over the positions whose label is not -100 (the head runs on those rows
    only); 0 (with a graph) when there are none."""
    keep = labels != IGNORE
    logits = head(hidden[keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum") / keep.sum().clamp(min=1)


def _is_loss(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.loss._Loss)


_HEAD_ORDER = {"distilbert": ["vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"]}


def mlm_head(base: nn.Module, source: str | None = None) -> nn.Module:
    """The masked-LM head for the base encoder ``base`` (a transformers ``AutoModel``): the one stored in
    ``source`` when that is a masked-LM checkpoint, else a new one built from ``base.config`` (random init, as
    ``AutoModelForMaskedLM.from_config``). The head is the masked-LM model's modules other than its base model
    (``cls`` for BERT/RoFormer, ``lm_head`` for RoBERTa, ``head`` + ``decoder`` for ModernBERT, ...), run in
    order; its output matrix is tied to ``base``'s input embeddings when the config ties them."""
    from transformers import AutoModelForMaskedLM

    from embedder.settings import load_errors

    config = base.config
    archs = getattr(config, "architectures", None) or []
    pretrained = source is not None and any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)
    try:
        lm = AutoModelForMaskedLM.from_pretrained(source, dtype=torch.float32) if pretrained else \
            AutoModelForMaskedLM.from_config(config)
    except ValueError as e:
        raise UserError(f"model type {config.model_type!r} has no masked-LM head in transformers "
                        f"({first_line(e)}); use a BERT-like encoder") from None
    except load_errors() as e:
        raise UserError(f"cannot load the masked-LM head of '{source}' ({first_line(e)})") from None
    prefix = lm.base_model_prefix
    children = dict(lm.named_children())
    # modules registered out of forward order: DistilBERT registers its activation first
    order = _HEAD_ORDER.get(config.model_type, [n for n in children if n != prefix])
    parts = [children[n] for n in order if n in children and not _is_loss(children[n])]
    if not parts:
        raise UserError(f"the masked-LM model of type {config.model_type!r} has no head module to reuse")
    out = lm.get_output_embeddings()
    if out is not None and getattr(config, "tie_word_embeddings", True):
        emb = base.get_input_embeddings()
        if out.weight.shape != emb.weight.shape:
            raise UserError(f"the masked-LM head of model type {config.model_type!r} predicts "
                            f"{out.weight.shape[0]} tokens but the encoder embeds {emb.weight.shape[0]}")
        out.weight = emb.weight
    head = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
    del lm
    return head


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _init_linear_and_norms(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DecoderLayer(nn.Module):
    """One post-LayerNorm BERT layer (attention + feed-forward, each with dropout, residual and LayerNorm) whose
    queries come from one stream and keys/values from another, built from an encoder's config (BERT field
    names, with ModernBERT's as fallbacks). ``visible`` [B, Lq, Lk] bool (True = may attend) or ``causal``."""

    def __init__(self, config):
        super().__init__()
        d = int(config.hidden_size)
        self.heads = int(_cfg(config, "num_attention_heads"))
        if d % self.heads:
            raise UserError(f"hidden size {d} is not a multiple of the {self.heads} attention heads")
        inner = int(_cfg(config, "intermediate_size", default=4 * d))
        eps = float(_cfg(config, "layer_norm_eps", "norm_eps", default=1e-12))
        act = _cfg(config, "hidden_act", "hidden_activation", default="gelu")
        from transformers.activations import ACT2FN

        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_dropout = float(_cfg(config, "attention_probs_dropout_prob", "attention_dropout", default=0.1))
        self.dense = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Linear(d, inner)
        self.act = ACT2FN[act] if isinstance(act, str) else act
        self.output = nn.Linear(inner, d)
        self.out_norm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(float(_cfg(config, "hidden_dropout_prob", "mlp_dropout", default=0.1)))
        _init_linear_and_norms(self, float(_cfg(config, "initializer_range", default=0.02)))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)     # [B, H, L, D/H]

    def forward(self, query: torch.Tensor, context: torch.Tensor, visible: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        q, k, v = self._split(self.query(query)), self._split(self.key(context)), self._split(self.value(context))
        mask = None if visible is None else visible[:, None].bool()          # [B, 1, Lq, Lk]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                  dropout_p=self.attn_dropout if self.training else 0.0)
        B, H, L, Dh = attended.shape
        attended = attended.transpose(1, 2).reshape(B, L, H * Dh)
        hidden = self.attn_norm(self.dropout(self.dense(attended)) + query)
        return self.out_norm(self.dropout(self.output(self.act(self.intermediate(hidden)))) + hidden)


class Positions(nn.Module):
    """Absolute position embeddings for a decoder: the embedding layer's own ``position_embeddings`` when it
    has them (offset past the padding index, as RoBERTa's are), else a table of its own (``own``: RoPE
    encoders, whose embedding layer adds no positions)."""

    def __init__(self, embeddings: nn.Module, config, limit: int):
        super().__init__()
        table = getattr(embeddings, "position_embeddings", None)
        self.own = not isinstance(table, nn.Embedding)
        if self.own:
            self.table = nn.Embedding(limit, int(config.hidden_size))
            nn.init.normal_(self.table.weight, std=float(_cfg(config, "initializer_range", default=0.02)))
            self.offset = 0
        else:
            self._shared = [table]   # not registered: it belongs to the encoder
            self.offset = 0 if table.padding_idx is None else table.padding_idx + 1

    def forward(self, length: int, device) -> torch.Tensor:
        table = self.table if self.own else self._shared[0]
        return table(torch.arange(self.offset, self.offset + length, device=device))[None]   # [1, L, D]


class RetroMAEModel(nn.Module):
    """The trained parts: ``encoder`` (an :class:`embedder.Encoder`, pooling cls), ``head`` (its MLM head),
    ``decoder`` (a :class:`DecoderLayer`) and ``positions``. ``forward(**batch)`` -> (loss, encoder MLM loss,
    decoder loss)."""

    def __init__(self, encoder, head: nn.Module, limit: int, vocab_embeddings: nn.Module | None = None,
                 vocab_config=None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        # the embedding layer (and config) of the vocabulary the decoder reads: the encoder's own, or (custom)
        # the main model's
        self.vocab_embeddings = vocab_embeddings
        config = vocab_config if vocab_config is not None else encoder.model.config
        self.decoder = DecoderLayer(config)
        self.positions = Positions(self.embeddings(), config, limit)

    def embeddings(self) -> nn.Module:
        if self.vocab_embeddings is not None:
            return self.vocab_embeddings
        emb = getattr(self.encoder.model, "embeddings", None)
        if emb is None:
            raise UserError(f"the encoder (model type {self.encoder.model.config.model_type!r}) has no "
                            f"'embeddings' layer for the decoder to read; use a BERT-like encoder")
        return emb

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, L, D] of the (masked) encoder input, in the decoder's width."""
        return self.encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def streams(self, cls: torch.Tensor, decoder_input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Enhanced decoding's two streams from the sentence embedding ``cls`` [B, 1, D] and the decoder input
        [B, L]: query ``h1 = cls + p`` and content ``h2 = [cls, e(x_1..)]`` (each [B, L, D])."""
        pos = self.positions(decoder_input_ids.shape[1], decoder_input_ids.device)
        content = self.embeddings()(input_ids=decoder_input_ids)
        if self.positions.own:
            content = content + pos
        content = content.to(cls.dtype) if content.dtype != cls.dtype else content
        h1 = cls + pos.to(cls.dtype)
        h2 = torch.cat([cls, content[:, 1:]], dim=1)
        return h1, h2

    def forward(self, input_ids, attention_mask, labels, decoder_input_ids, decoder_labels, decoder_attention):
        hidden = self.encode(input_ids, attention_mask)
        enc_loss = masked_lm_loss(self.head, hidden, labels)
        h1, h2 = self.streams(hidden[:, :1], decoder_input_ids)
        out = self.decoder(h1, h2, visible=decoder_attention)
        dec_loss = masked_lm_loss(self.head, out, decoder_labels)
        return enc_loss + dec_loss, enc_loss, dec_loss


# ====================================================================== the task


class MaskedTextTask(Task):
    """What the text pre-training tasks share: text rows, the tokenizer (loaded lazily when collate runs
    without build), masking options, and the (loss, metrics) of a module whose forward returns
    (loss, encoder MLM, decoder)."""

    row_kind = "text"
    ratio_option = "mask_ratio"

    def __init__(self, options: TaskOptions):
        super().__init__(options)
        check_ratio(self.ratio_option, getattr(options, self.ratio_option))
        if not isinstance(options.max_length, int) or isinstance(options.max_length, bool) or options.max_length < 2:
            raise UserError(f"max_length={options.max_length!r} must be an integer of at least 2")
        self._tokenizer = None
        self._limit: int | None = None
        self._config = None      # with model_config: the transformers config the random init is built from

    def check_row(self, row: dict, where: str) -> dict:
        return text_row(row, where)

    def _load_tokenizer(self):
        """(tokenizer, max_length of the encoder) without building the model."""
        raise NotImplementedError

    def tokenizer_and_limit(self):
        if self._tokenizer is None:
            self._tokenizer, self._limit = self._load_tokenizer()
        return self._tokenizer, min(self.options.max_length, self._limit)

    def loss(self, module, batch: dict[str, Any], gather=None):
        loss, enc, dec = module(**batch)
        return loss, {"loss": float(loss.detach()), "enc_mlm": float(enc.detach()), "dec": float(dec.detach())}

    def save(self, module, output_dir: str) -> None:
        inner = getattr(module, "module", module)
        inner.encoder.save(output_dir)


class RetroMAETask(MaskedTextTask):
    """RetroMAE (see the module docstring). Options: ``model`` (the encoder to start from), ``mask_ratio``,
    ``decoder_mask_ratio``, ``max_length``; ``pooling`` must be unset or ``cls``."""

    name = "retromae"

    uses_decoder_mask = True
    from_config = True       # model_config + tokenizer: pre-train a random-init encoder

    def __init__(self, options: TaskOptions):
        super().__init__(options)
        if self.uses_decoder_mask:
            check_ratio("decoder_mask_ratio", options.decoder_mask_ratio, low_open=False)
        if options.pooling not in (None, "cls"):
            raise UserError(f"{self.name} trains the [CLS] embedding: pooling must be 'cls' (or unset), not "
                            f"{options.pooling!r}")

    def _load_tokenizer(self):
        if self.options.model_config is not None:
            from embedder.tasks.mlm import scratch_tokenizer

            tokenizer, limit, self._config = scratch_tokenizer(self.options)
            need_leading_special(tokenizer, f"'{self.options.tokenizer}'")
            return tokenizer, limit
        tokenizer, limit = encoder_tokenizer(self.options.model)
        need_mask_token(tokenizer, f"'{self.options.model}'")
        need_leading_special(tokenizer, f"'{self.options.model}'")
        return tokenizer, limit

    def load_encoder(self, device):
        """The encoder (pooling cls) and its MLM head: loaded from ``model``, or built with random weights
        from ``model_config`` and ``tokenizer``."""
        from embedder.encoder import Encoder
        from embedder.settings import MODEL_FIX, resolve_model

        if self.options.model_config is not None:
            from embedder.tasks.mlm import scratch_model

            tokenizer, limit = self.tokenizer_and_limit()
            base = scratch_model(self._config, self.options)
            return Encoder(base, tokenizer, pooling="cls", normalize=False, max_length=limit), mlm_head(base)
        encoder = Encoder.load(self.options.model, pooling="cls", device=device, option="--model")
        where = f"'{self.options.model}'"
        need_mask_token(encoder.tokenizer, where)
        need_leading_special(encoder.tokenizer, where)
        self._tokenizer, self._limit = encoder.tokenizer, encoder.max_length
        return encoder, mlm_head(encoder.model, resolve_model(self.options.model, "--model", MODEL_FIX))

    def build(self, device) -> RetroMAEModel:
        encoder, head = self.load_encoder(device)
        _, limit = self.tokenizer_and_limit()
        return RetroMAEModel(encoder, head, limit).to(device).train()

    def collate(self, rows: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``input_ids`` (masked at mask_ratio), ``attention_mask``, ``labels``, ``decoder_input_ids`` (the
        unmasked text), ``decoder_labels``, ``decoder_attention`` [B, L, L] bool."""
        tokenizer, limit = self.tokenizer_and_limit()
        b = masked_lm_batch(tokenizer, [r["text"] for r in rows], limit, self.options.mask_ratio, rng)
        ids, special = b.pop("ids"), b.pop("special")
        b["decoder_input_ids"] = ids
        b["decoder_labels"] = reconstruction_labels(ids, b["attention_mask"], special)
        b["decoder_attention"] = enhanced_decoding_mask(b["attention_mask"], special, self.options.decoder_mask_ratio,
                                                        rng)
        return as_tensors(b)


TASK = RetroMAETask
