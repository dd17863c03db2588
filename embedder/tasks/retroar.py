"""RetroAR: RetroMAE's masked encoder with an autoregressive decoder instead of the enhanced one.

Rows, tokenization, the encoder masking (``options.mask_ratio``, 80/10/10) and the encoder's masked-LM loss
are those of :mod:`embedder.tasks.retromae` (:mod:`embedder.tasks.masked_lm`); the sentence embedding is the
[CLS] hidden state of the masked text. The decoder is a small GPT-style block: its input is ``[cls, e(x_1),
..., e(x_n), e([SEP])]``: the sentence embedding as a prefix in place of the [CLS] token, then the word
embeddings (the encoder's input matrix) of the *unmasked* text, plus the decoder's own learned position
embeddings, LayerNorm and dropout; one causal transformer layer
(:class:`embedder.tasks.decoders.DecoderLayer`, each position sees itself and the positions before it); and
its own LM head (:class:`embedder.tasks.decoders.ARHead`: dense + activation + LayerNorm, then an output layer
whose matrix is tied to the word embeddings, with its own bias).

Labels (``decoder_labels``, aligned with the decoder input): -100 at the prefix, at [SEP] and other special
tokens and at padding; the token id at every text token. The output at position ``t`` predicts the label at
``t + 1`` (the loss uses ``logits[:, :-1]`` against ``decoder_labels[:, 1:]``): the prefix alone predicts
the first token, and nothing predicts the prefix. Loss = encoder MLM + AR loss (token means).

Only the encoder is saved (pooling ``cls``), as in retromae.

The trained module is :class:`embedder.tasks.models.RetroARModel`; this module imports no torch (its methods
load it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embedder.tasks.base import MASK_RATIO, MAX_LENGTH, MODEL, MODEL_CONFIG, POOLING, TOKENIZER
from embedder.tasks.masked_lm import as_tensors, masked_lm_batch, reconstruction_labels
from embedder.tasks.retromae import RetroMAETask

if TYPE_CHECKING:
    import torch

    from embedder.tasks.models import RetroARModel


class RetroARTask(RetroMAETask):
    """RetroAR (see the module docstring). Options as retromae's, less ``decoder_mask_ratio``."""

    name = "retroar"
    summary = ("pre-train an encoder on raw text: masked encoder + one-layer autoregressive decoder (rows {'text'}; "
               "from --model or a random init)")
    OPTIONS = (MODEL, MODEL_CONFIG, TOKENIZER, MAX_LENGTH, POOLING, MASK_RATIO)
    uses_decoder_mask = False

    def build(self, device) -> RetroARModel:
        from embedder.tasks.models import RetroARModel

        encoder, head = self.load_encoder(device)
        _, limit = self.tokenizer_and_limit()
        return RetroARModel(encoder, head, limit).to(device).train()

    def collate(self, rows: list[dict], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``input_ids`` (masked), ``attention_mask``, ``labels``, ``decoder_input_ids`` (unmasked),
        ``decoder_labels`` (aligned with the decoder input; -100 at the prefix)."""
        tokenizer, limit = self.tokenizer_and_limit()
        b = masked_lm_batch(tokenizer, [r["text"] for r in rows], limit, self.options.mask_ratio, rng)
        ids, special = b.pop("ids"), b.pop("special")
        b["decoder_input_ids"] = ids
        labels = reconstruction_labels(ids, b["attention_mask"], special)
        labels[:, 0] = -100                      # the prefix (the [CLS] position) is never a target
        b["decoder_labels"] = labels
        return as_tensors(b)


TASK = RetroARTask
