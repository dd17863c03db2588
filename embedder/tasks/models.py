"""The trained modules of the training tasks (torch): what each task's :meth:`~embedder.tasks.base.Task.build`
returns, plus the masked-LM head they share (:func:`mlm_head`) and its loss (:func:`masked_lm_loss`).

- :class:`ContrastiveModel` (task contrastive): the encoder and its temperature.
- :class:`MLMModel` (task mlm): the encoder and its masked-LM head.
- :class:`RetroMAEModel` (task retromae): the encoder, its head and the enhanced decoder.
- :class:`CustomModel` (task custom): RetroMAE with a separate document encoder.
- :class:`RetroARModel` (task retroar): the encoder, its head and an autoregressive decoder.

They live here, not in the task modules, so that a task module imports no torch (``train --help`` imports every
task module to read its options); a task imports this module in its ``build``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedder.errors import UserError, first_line
from embedder.losses import Temperature
from embedder.masking import IGNORE
from embedder.settings import load_errors
from embedder.tasks.contrastive import PARTS
from embedder.tasks.decoders import ARHead, DecoderLayer, Positions, config_value, init_linear_and_norms


# ====================================================================== the masked-LM head


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


# ====================================================================== contrastive


class ContrastiveModel(nn.Module):
    """The trained parts: the encoder and, when learnable, the temperature. ``forward`` embeds a batch's
    queries, positives and hard negatives in one call (so data-parallel wrappers see one forward)."""

    def __init__(self, encoder, temperature: float, learnable: bool):
        super().__init__()
        self.encoder = encoder
        self.temperature = Temperature(temperature, min_value=min(1e-3, temperature)) if learnable else None
        self.register_buffer("fixed_temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, **batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for part in PARTS:
            ids = batch.get(f"{part}_input_ids")
            if ids is None or ids.shape[0] == 0:
                out.append(out[0].new_zeros((0, out[0].shape[1])))
                continue
            emb = self.encoder(ids, batch[f"{part}_attention_mask"], batch.get(f"{part}_special_tokens_mask"))
            out.append(F.normalize(emb.float(), p=2, dim=-1))
        t = self.temperature() if self.temperature is not None else self.fixed_temperature
        return out[0], out[1], out[2], t


# ====================================================================== mlm


class MLMModel(nn.Module):
    """``encoder`` (an :class:`embedder.Encoder`) + its masked-LM ``head``; ``forward(**batch)`` ->
    (loss, loss, 0): the loss is the encoder's MLM loss, and there is no decoder."""

    def __init__(self, encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = masked_lm_loss(self.head, hidden, labels)
        return loss, loss, torch.zeros((), device=loss.device)


# ====================================================================== retromae and custom


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


class CustomModel(RetroMAEModel):
    """RetroMAE whose encoder is the document encoder and whose vocabulary side (``vocab_embeddings``,
    ``head``) is the main model's; ``project`` maps the document encoder's width to the main model's."""

    def __init__(self, encoder, head: nn.Module, limit: int, vocab_embeddings: nn.Module, vocab_config):
        super().__init__(encoder, head, limit, vocab_embeddings=vocab_embeddings, vocab_config=vocab_config)
        d_doc, d_main = int(encoder.model.config.hidden_size), int(vocab_config.hidden_size)
        self.project = nn.Identity() if d_doc == d_main else nn.Linear(d_doc, d_main)
        if isinstance(self.project, nn.Linear):
            nn.init.normal_(self.project.weight, std=float(getattr(vocab_config, "initializer_range", 0.02) or 0.02))
            nn.init.zeros_(self.project.bias)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.project(hidden)


# ====================================================================== retroar


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
