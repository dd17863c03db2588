"""What the masked-LM pre-training tasks (mlm, retromae, retroar, custom) share.

- Rows: ``text`` rows (:func:`text_row`).
- Batches: texts tokenized with the encoder's tokenizer and right-padded (:func:`tokenize`), then masked at a
  ratio (:func:`masked_lm_batch`: :func:`embedder.masking.mask_tokens`, 80% mask token, 10% a random token,
  10% unchanged; special tokens and padding never), plus the labels of a decoder that reconstructs the whole
  text (:func:`reconstruction_labels`).
- :class:`MaskedTextTask`: the tokenizer, the encoder and its head, either of a trained encoder (``--model``)
  or of a random-init one built from ``--model-config`` and ``--tokenizer`` (:mod:`embedder.tasks.scratch`),
  and the metrics of a module whose forward returns (loss, encoder MLM loss, decoder loss).

The masked-LM head (:func:`embedder.tasks.models.mlm_head`: the checkpoint's own, or a new one built from the
encoder's config), its loss (:func:`embedder.tasks.models.masked_lm_loss`) and the tasks' models are in
:mod:`embedder.tasks.models`: this module imports no torch (the tasks import it), and loads torch and the model
code only where a batch becomes tensors (:func:`as_tensors`) or an encoder is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.errors import UserError
from embedder.masking import IGNORE, mask_tokens
from embedder.settings import MODEL_FIX, resolve_model
from embedder.tasks.base import Task, TaskOptions
from embedder.tasks.scratch import build_config, load_tokenizer, scratch_model

if TYPE_CHECKING:
    import torch

TEXT_KEYS = ("text", "document", "doc", "passage", "pos")
_SPECIAL_ATTRS = ("cls", "sep", "pad", "bos", "eos", "mask")   # never masked, never a decoder label


# ====================================================================== rows, tokenizers and batches


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
    """Texts -> right-padded (ids, attention, special) int64 arrays [B, L] (:func:`embedder.encoder.pad_right`);
    ``special`` is 1 at the tokens the tokenizer adds, at any special id inside a text, and at padding."""
    from embedder.encoder import pad_id, pad_right

    enc = tokenizer(list(texts), truncation=True, max_length=limit, padding=False, return_attention_mask=False,
                    return_token_type_ids=False, return_special_tokens_mask=True)
    pad = pad_id(tokenizer)
    fill = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad
    # a text the tokenizer turns into nothing (no post-processor): one [UNK]
    rows = [r if r else [fill] for r in enc["input_ids"]]
    marks = [m if r else [0] for r, m in zip(enc["input_ids"], enc["special_tokens_mask"])]
    ids, attention, special = pad_right(rows, pad, special=marks)
    special |= np.isin(ids, special_ids(tokenizer)).astype(np.int64)
    return ids, attention, special


def check_ratio(name: str, value, low_open: bool = True) -> float:
    """``value`` as a float when it is a number in (0, 1) (``low_open`` False: [0, 1)); else a UserError
    naming the option ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0)
    if not ok:
        raise UserError(f"{name}={value!r} must be a number {'>' if low_open else '>='} 0 and < 1")
    return float(value)


def need_mask_token(tokenizer, where: str) -> None:
    """Masked-LM training needs a mask token and (for batching) a padding token; else a UserError naming
    ``where``."""
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


def scratch_tokenizer(options: TaskOptions):
    """(tokenizer, max_length, config) of a random-init encoder: ``options.tokenizer`` (which must have a mask
    token) and ``options.model_config`` fitted to it (:func:`embedder.tasks.scratch.build_config`); max_length
    is ``options.max_length`` capped at the config's ``max_position_embeddings``."""
    tokenizer = load_tokenizer(options.tokenizer)
    need_mask_token(tokenizer, f"'{options.tokenizer}'")
    config = build_config(options.model_config, tokenizer)
    positions = getattr(config, "max_position_embeddings", None)
    limit = min(x for x in (options.max_length, positions) if x is not None)
    tokenizer.model_max_length = limit
    return tokenizer, int(limit), config


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
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


# ====================================================================== the task


class MaskedTextTask(Task):
    """What the text pre-training tasks share: text rows, the tokenizer (loaded without the model when collate
    runs before or without build), the encoder and its masked-LM head (:meth:`load_encoder`), the masking
    ratio option, and the (loss, metrics) of a module whose forward returns (loss, encoder MLM, decoder)."""

    row_kind = "text"
    ratio_option = "mask_ratio"
    #: whether the sentence embedding is the hidden state at position 0 (the tokenizer must put [CLS] there)
    leading_special = False

    def __init__(self, options: TaskOptions | None = None):
        super().__init__(options)
        check_ratio(self.ratio_option, getattr(self.options, self.ratio_option))
        self._config = None      # with model_config: the transformers config the random init is built from

    def check_row(self, row: dict, where: str) -> dict:
        return text_row(row, where)

    def encoder_pooling(self) -> str | None:
        """The pooling the encoder is loaded with (None: the model's own; a new encoder: mean)."""
        return self.options.pooling

    def _check_tokenizer(self, tokenizer, where: str) -> None:
        need_mask_token(tokenizer, where)
        if self.leading_special:
            need_leading_special(tokenizer, where)

    def encoder_tokenizer(self):
        """(tokenizer, the encoder's max_length) of ``model``, or of the random-init encoder that
        ``model_config`` + ``tokenizer`` build, without building it."""
        o = self.options
        if o.model_config is not None:
            tokenizer, limit, self._config = scratch_tokenizer(o)
            if self.leading_special:
                need_leading_special(tokenizer, f"'{o.tokenizer}'")
            return tokenizer, limit
        tokenizer, limit = super().encoder_tokenizer()
        self._check_tokenizer(tokenizer, f"'{o.model}'")
        return tokenizer, limit

    def load_encoder(self, device):
        """The encoder (:meth:`encoder_pooling`) and its MLM head: loaded from ``model``, or built with random
        weights from ``model_config`` and ``tokenizer``."""
        from embedder.encoder import Encoder
        from embedder.tasks.models import mlm_head

        o = self.options
        if o.model_config is not None:
            tokenizer, limit = self.tokenizer_and_limit()
            base = scratch_model(self._config, o)
            encoder = Encoder(base, tokenizer, pooling=self.encoder_pooling() or "mean", normalize=False,
                              max_length=limit)
            return encoder, mlm_head(base)
        encoder = Encoder.load(o.model, pooling=self.encoder_pooling(), device=device, option="--model")
        self._check_tokenizer(encoder.tokenizer, f"'{o.model}'")
        self.use_tokenizer(encoder.tokenizer, encoder.max_length)
        return encoder, mlm_head(encoder.model, resolve_model(o.model, "--model", MODEL_FIX))

    def loss(self, module, batch: dict[str, Any], gather=None):
        loss, enc, dec = module(**batch)
        return loss, {"loss": float(loss.detach()), "enc_mlm": float(enc.detach()), "dec": float(dec.detach())}

    def save(self, module, output_dir: str) -> None:
        inner = getattr(module, "module", module)
        inner.encoder.save(output_dir)
