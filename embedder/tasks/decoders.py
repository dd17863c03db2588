"""The decoder parts of the pre-training tasks: :class:`DecoderLayer` (one BERT layer whose queries and
keys/values may be two streams; RetroMAE's enhanced decoder and RetroAR's causal one), :class:`Positions`
(a decoder's absolute position embeddings), :class:`ARHead` (RetroAR's LM head), and the config reading and
initialisation they share. Each is built from the encoder's transformers config (BERT field names, with
ModernBERT's as fallbacks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedder.errors import UserError


def config_value(config, *names, default=None):
    """The first of the config fields ``names`` that is set (BERT's name first, then other architectures'), else
    ``default``."""
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def init_linear_and_norms(module: nn.Module, std: float) -> None:
    """BERT's initialisation of a new part: linear and embedding weights ~ N(0, std), biases 0, LayerNorms
    1 and 0."""
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
        self.heads = int(config_value(config, "num_attention_heads"))
        if d % self.heads:
            raise UserError(f"hidden size {d} is not a multiple of the {self.heads} attention heads")
        inner = int(config_value(config, "intermediate_size", default=4 * d))
        eps = float(config_value(config, "layer_norm_eps", "norm_eps", default=1e-12))
        act = config_value(config, "hidden_act", "hidden_activation", default="gelu")
        from transformers.activations import ACT2FN

        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_dropout = float(config_value(config, "attention_probs_dropout_prob", "attention_dropout",
                                               default=0.1))
        self.dense = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Linear(d, inner)
        self.act = ACT2FN[act] if isinstance(act, str) else act
        self.output = nn.Linear(inner, d)
        self.out_norm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(float(config_value(config, "hidden_dropout_prob", "mlp_dropout", default=0.1)))
        init_linear_and_norms(self, float(config_value(config, "initializer_range", default=0.02)))

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
            nn.init.normal_(self.table.weight, std=float(config_value(config, "initializer_range", default=0.02)))
            self.offset = 0
        else:
            self._shared = [table]   # not registered: it belongs to the encoder
            self.offset = 0 if table.padding_idx is None else table.padding_idx + 1

    def forward(self, length: int, device) -> torch.Tensor:
        table = self.table if self.own else self._shared[0]
        return table(torch.arange(self.offset, self.offset + length, device=device))[None]   # [1, L, D]


class ARHead(nn.Module):
    """dense + activation + LayerNorm, then logits over the vocabulary with the (tied) word embeddings."""

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        from transformers.activations import ACT2FN

        d = int(config.hidden_size)
        act = config_value(config, "hidden_act", "hidden_activation", default="gelu")
        self.dense = nn.Linear(d, d)
        self.act = ACT2FN[act] if isinstance(act, str) else act
        self.norm = nn.LayerNorm(d, eps=float(config_value(config, "layer_norm_eps", "norm_eps", default=1e-12)))
        vocab = word_embeddings.weight.shape[0]
        self.out = nn.Linear(d, vocab)
        init_linear_and_norms(self, float(config_value(config, "initializer_range", default=0.02)))
        self.out.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.act(self.dense(hidden))))
