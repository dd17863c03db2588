"""mlm: masked-LM pre-training of an encoder, built from scratch from a config (or continued from a model).

The model:

- ``options.model_config`` (a config.json, a directory holding one, or a dict) builds a random-init encoder:
  its ``model_type`` picks the architecture, e.g. ``bert``, or RoPE encoders ``roformer`` /
  ``modernbert`` (any type that ``AutoModelForMaskedLM`` builds). The tokenizer is ``options.tokenizer`` (a
  directory or a tokenizer.json, e.g. ``retro-pipeline train-tokenizer`` output; see
  :func:`embedder.tasks.scratch.load_tokenizer`).
  ``vocab_size``: when the config leaves it out it is set to the tokenizer's size; when it is smaller than
  the tokenizer a :class:`UserError` says so (a larger one is kept: the extra rows are never used). The
  special-token ids a config leaves out (``pad_token_id``, and ``bos/eos/cls/sep_token_id``) are set from the
  tokenizer. The saved pooling is ``options.pooling`` or ``mean``; max_length is ``options.max_length``
  capped at the config's ``max_position_embeddings``.
- without ``model_config``, pre-training continues from ``options.model`` (its tokenizer, its masked-LM head
  when it has one, its pooling unless ``options.pooling`` says otherwise).

Rows are ``text`` rows (:func:`embedder.tasks.masked_lm.text_row`). Each text is masked at
``options.mlm_probability`` (0.15; 80% mask token, 10% random token, 10% unchanged; special tokens and padding
never; :func:`embedder.masking.mask_tokens`); the loss is the mean cross-entropy over the masked positions.
Only the encoder is saved (:meth:`embedder.Encoder.save`).

The trained module is :class:`embedder.tasks.models.MLMModel`; this module imports no torch (its methods load
it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embedder.options import Option
from embedder.tasks.base import MAX_LENGTH, MODEL, MODEL_CONFIG, POOLING, TOKENIZER
from embedder.tasks.masked_lm import MaskedTextTask, as_tensors, masked_lm_batch
from embedder.tasks.scratch import load_tokenizer

if TYPE_CHECKING:
    import torch

    from embedder.tasks.models import MLMModel

# load_tokenizer: callers that load a --tokenizer as this task does import it from here too
__all__ = ["MLMTask", "TASK", "load_tokenizer"]


class MLMTask(MaskedTextTask):
    """mlm (see the module docstring). Options: ``model_config`` + ``tokenizer`` (from scratch) or ``model``,
    ``mlm_probability``, ``max_length``, ``pooling``."""

    name = "mlm"
    summary = "masked-language-model pre-training (rows {'text'}; from --model or a random init)"
    ratio_option = "mlm_probability"
    OPTIONS = (MODEL, MODEL_CONFIG, TOKENIZER, MAX_LENGTH, POOLING,
               Option("mlm_probability", float, 0.15, "Share of tokens masked (above 0, below 1)."))

    def build(self, device) -> MLMModel:
        from embedder.tasks.models import MLMModel

        return MLMModel(*self.load_encoder(device)).to(device).train()

    def collate(self, rows: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``input_ids`` (masked at mlm_probability), ``attention_mask``, ``labels``."""
        tokenizer, limit = self.tokenizer_and_limit()
        b = masked_lm_batch(tokenizer, [r["text"] for r in rows], limit, self.options.mlm_probability, rng)
        del b["ids"], b["special"]
        return as_tensors(b)

    def loss(self, module, batch, gather=None):
        loss, _, _ = module(**batch)
        return loss, {"loss": float(loss.detach()), "enc_mlm": float(loss.detach())}


TASK = MLMTask
