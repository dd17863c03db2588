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
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from embedder.tasks.decoders import ARHead, DecoderLayer, config_value, init_linear_and_norms
from embedder.tasks.masked_lm import as_tensors, masked_lm_batch, masked_lm_loss, reconstruction_labels
from embedder.tasks.retromae import RetroMAETask


class RetroARModel(nn.Module):
    """``encoder`` + its MLM ``head`` + the AR decoder (``positions``, ``norm``, ``decoder``, ``lm_head``);
    ``forward(**batch)`` -> (loss, encoder MLM loss, AR loss)."""

    def __init__(self, encoder, head: nn.Module, limit: int):
        super().__init__()
        self.encoder = encoder
        self.head = head
        config = encoder.model.config
        d = int(config.hidden_size)
        self.positions = nn.Embedding(limit, d)
        self.norm = nn.LayerNorm(d, eps=float(config_value(config, "layer_norm_eps", "norm_eps", default=1e-12)))
        self.dropout = nn.Dropout(float(config_value(config, "hidden_dropout_prob", "mlp_dropout", default=0.1)))
        for new_part in (self.positions, self.norm):   # never the encoder or its head: they come trained
            init_linear_and_norms(new_part, float(config_value(config, "initializer_range", default=0.02)))
        self.decoder = DecoderLayer(config)
        self.lm_head = ARHead(config, encoder.model.get_input_embeddings())

    def decoder_inputs(self, cls: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """[B, 1, D] sentence embedding + [B, L] ids -> [B, L, D]: the prefix in place of position 0."""
        words = self.encoder.model.get_input_embeddings()(decoder_input_ids)
        x = torch.cat([cls.to(words.dtype), words[:, 1:]], dim=1)
        x = x + self.positions(torch.arange(x.shape[1], device=x.device))[None]
        return self.dropout(self.norm(x))

    def decoder_hidden(self, cls: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        x = self.decoder_inputs(cls, decoder_input_ids)
        return self.decoder(x, x, causal=True)

    def forward(self, input_ids, attention_mask, labels, decoder_input_ids, decoder_labels):
        hidden = self.encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        enc_loss = masked_lm_loss(self.head, hidden, labels)
        out = self.decoder_hidden(hidden[:, :1], decoder_input_ids)
        ar_loss = masked_lm_loss(self.lm_head, out[:, :-1], decoder_labels[:, 1:])   # t predicts t + 1
        return enc_loss + ar_loss, enc_loss, ar_loss


class RetroARTask(RetroMAETask):
    """RetroAR (see the module docstring). Options as retromae's, less ``decoder_mask_ratio``."""

    name = "retroar"
    uses_decoder_mask = False

    def build(self, device) -> RetroARModel:
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
