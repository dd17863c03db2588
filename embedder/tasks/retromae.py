"""RetroMAE pre-training (Xiao et al. 2022, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via
Masked Auto-Encoder").

Rows: ``text`` (see :func:`embedder.tasks.masked_lm.text_row`). Per text (tokenized with the model's tokenizer to
``options.max_length`` tokens, capped at the encoder's max_length):

- **Encoder**: the text masked at ``options.mask_ratio`` (0.3; :func:`embedder.masking.mask_tokens`: 80%
  [MASK], 10% a random token, 10% unchanged; [CLS]/[SEP]/[PAD] never masked), trained with masked-LM on its
  own masked positions. The MLM head is the checkpoint's own when it is a masked-LM checkpoint (its
  ``architectures`` say ``*ForMaskedLM`` / ``*ForPreTraining``), else a new ``AutoModelForMaskedLM``-style head
  built from the encoder's config (e.g. ``BertOnlyMLMHead``), its output matrix tied to the input embeddings.
  The sentence embedding is the [CLS] hidden state of the masked text (pooling ``cls``).
- **Enhanced decoder**: one transformer layer of the encoder's width
  (:class:`embedder.tasks.decoders.DecoderLayer`, a BERT layer
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

The trained module is :class:`embedder.tasks.models.RetroMAEModel`; this module imports no torch (its methods
load it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embedder.errors import UserError
from embedder.masking import enhanced_decoding_mask
from embedder.tasks.base import DECODER_MASK_RATIO, MASK_RATIO, MAX_LENGTH, MODEL, MODEL_CONFIG, POOLING, TOKENIZER, \
    TaskOptions
from embedder.tasks.masked_lm import MaskedTextTask, as_tensors, check_ratio, masked_lm_batch, reconstruction_labels

if TYPE_CHECKING:
    import torch

    from embedder.tasks.models import RetroMAEModel


# ====================================================================== the task


class RetroMAETask(MaskedTextTask):
    """RetroMAE (see the module docstring). Options: ``model`` (the encoder to start from), ``mask_ratio``,
    ``decoder_mask_ratio``, ``max_length``; ``pooling`` must be unset or ``cls``."""

    name = "retromae"
    summary = ("pre-train an encoder on raw text: masked encoder + one-layer enhanced decoder (rows {'text'}; "
               "from --model or a random init: --model-config, --tokenizer)")
    OPTIONS = (MODEL, MODEL_CONFIG, TOKENIZER, MAX_LENGTH, POOLING, MASK_RATIO, DECODER_MASK_RATIO)

    leading_special = True   # the sentence embedding is the [CLS] hidden state
    uses_decoder_mask = True

    def __init__(self, options: TaskOptions | None = None):
        super().__init__(options)
        if self.uses_decoder_mask:
            check_ratio("decoder_mask_ratio", self.options.decoder_mask_ratio, low_open=False)
        if self.options.pooling not in (None, "cls"):
            raise UserError(f"{self.name} trains the [CLS] embedding: pooling must be 'cls' (or unset), not "
                            f"{self.options.pooling!r}")

    def encoder_pooling(self) -> str:
        return "cls"

    def build(self, device) -> RetroMAEModel:
        from embedder.tasks.models import RetroMAEModel

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
