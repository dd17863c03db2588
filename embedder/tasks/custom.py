"""custom: RetroMAE with a separate document encoder (``options.document_model``).

Two models take part:

- the **main model** (``options.model``) gives the vocabulary side: its tokenizer (every text is tokenized
  with it), its embedding layer (the decoder's content stream and position embeddings) and its masked-LM head
  (the checkpoint's own when it is a masked-LM checkpoint, else a new one; see
  :func:`embedder.tasks.models.mlm_head`). Its transformer layers are not used and not kept.
- the **document encoder** (``options.document_model``, any Hugging Face encoder directory or hub id) plays
  RetroMAE's encoder: it reads the main tokenizer's ids of the masked text (``options.mask_ratio``), its
  hidden states are trained with masked-LM through the main model's head, and its [CLS] hidden state is the
  sentence embedding the enhanced decoder (:mod:`embedder.tasks.retromae`) reconstructs the unmasked text
  from, in the main model's vocabulary. When its hidden size differs from the main model's, one linear
  projection (trained, not saved) maps its hidden states into the main model's width.

Because the document encoder reads the main tokenizer's ids, both models must have the same vocabulary size
(``config.vocab_size``); otherwise :class:`UserError` names both models and both sizes. A document encoder
whose own tokenizer maps tokens to other ids than the main one is trained on the main tokenizer's ids all the
same (a warning says so).

Saved: the **document encoder**, the one that produces the embeddings (the encoder a build would embed
with), with pooling ``cls``, its own normalize setting, and the main model's tokenizer (the ids it was trained
on), via :meth:`embedder.Encoder.save`. The main model's parts and the decoder are training-only.

The trained module is :class:`embedder.tasks.models.CustomModel`; this module imports no torch (its methods
load it).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from embedder.errors import UserError, first_line
from embedder.settings import MODEL_FIX, check_model_dir, load_errors, read_settings, resolve_model
from embedder.options import Option
from embedder.tasks.base import DECODER_MASK_RATIO, MASK_RATIO, MAX_LENGTH, MODEL, POOLING, TaskOptions
from embedder.tasks.retromae import RetroMAETask

if TYPE_CHECKING:
    from embedder.tasks.models import CustomModel

log = logging.getLogger(__name__)


def _config(name: str, what: str):
    from transformers import AutoConfig

    fix = MODEL_FIX if what == "--model" else f"pass a model directory (config.json, weights, tokenizer) or a hub " \
                                              f"id as {what}"
    path = resolve_model(name, what, fix)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        check_model_dir(path, what, fix)
    try:
        return path, AutoConfig.from_pretrained(path)
    except load_errors() as e:
        raise UserError(f"cannot load the config of {what} '{path}' ({first_line(e)})") from None


class CustomTask(RetroMAETask):
    """custom (see the module docstring). Options: ``model`` (main model), ``document_model`` (required),
    ``mask_ratio``, ``decoder_mask_ratio``, ``max_length``."""

    name = "custom"
    summary = "RetroMAE of a separate --document-model against --model's vocabulary, decoder and MLM head"
    OPTIONS = (MODEL, Option("document_model", str, None, "The separate document encoder (a directory or hub id); "
                             "required.", path=True), MAX_LENGTH, POOLING, MASK_RATIO, DECODER_MASK_RATIO)

    def __init__(self, options: TaskOptions | None = None):
        super().__init__(options)
        if not self.options.document_model:
            raise UserError("task custom needs a document encoder: pass document_model (--document-model), a "
                            "Hugging Face encoder directory or hub id")

    def check_vocabularies(self):
        """(main path, main config, document path, document config); UserError when the vocabulary sizes
        differ."""
        main_path, main_cfg = _config(self.options.model, "--model")
        doc_path, doc_cfg = _config(self.options.document_model, "--document-model")
        main_v, doc_v = getattr(main_cfg, "vocab_size", None), getattr(doc_cfg, "vocab_size", None)
        if main_v != doc_v:
            raise UserError(f"task custom: the document encoder '{doc_path}' has a vocabulary of {doc_v} tokens "
                            f"but the main model '{main_path}' has {main_v}; the document encoder reads the main "
                            f"model's token ids, so use a document encoder with the same vocabulary size "
                            f"({main_v})")
        return main_path, main_cfg, doc_path, doc_cfg

    def encoder_tokenizer(self):
        """The main model's tokenizer (checked as retromae checks it); max_length: the main model's, capped at
        the document encoder's."""
        _, _, doc_path, doc_cfg = self.check_vocabularies()
        tokenizer, limit = super().encoder_tokenizer()
        limits = [limit, getattr(doc_cfg, "max_position_embeddings", None), read_settings(doc_path).get("max_length")]
        return tokenizer, int(min(x for x in limits if x is not None))

    def build(self, device) -> CustomModel:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from embedder.encoder import Encoder
        from embedder.tasks.models import CustomModel, mlm_head

        main_path, _, doc_path, _ = self.check_vocabularies()
        tokenizer, limit = self.tokenizer_and_limit()
        try:
            main = AutoModel.from_pretrained(main_path, dtype=torch.float32)
        except load_errors() as e:
            raise UserError(f"cannot load the main model '{main_path}' ({first_line(e)})") from None
        try:
            doc = AutoModel.from_pretrained(doc_path, dtype=torch.float32)
        except load_errors() as e:
            raise UserError(f"cannot load the document encoder '{doc_path}' ({first_line(e)})") from None
        try:
            doc_tokenizer = AutoTokenizer.from_pretrained(doc_path, use_fast=True)
        except (*load_errors(), AttributeError):  # no tokenizer of its own: nothing to compare
            doc_tokenizer = None
        if doc_tokenizer is not None and doc_tokenizer.get_vocab() != tokenizer.get_vocab():
            log.warning("task custom: the document encoder '%s' has a tokenizer of its own that differs from the "
                        "main model's; it is trained on (and saved with) the main model's tokenizer", doc_path)
        head = mlm_head(main, main_path)
        embeddings = getattr(main, "embeddings", None)
        if embeddings is None:
            raise UserError(f"the main model '{main_path}' (model type {main.config.model_type!r}) has no "
                            f"'embeddings' layer for the decoder; use a BERT-like main model")
        normalize = bool(read_settings(doc_path).get("normalize") or False)
        encoder = Encoder(doc, tokenizer, pooling="cls", normalize=normalize, max_length=limit)
        module = CustomModel(encoder, head, limit, vocab_embeddings=embeddings, vocab_config=main.config)
        del main  # its transformer layers are not used: only its embeddings (and the head tied to them) stay
        return module.to(device).train()


TASK = CustomTask
