"""mlm: masked-LM pre-training of an encoder, built from scratch from a config (or continued from a model).

The model:

- ``options.model_config`` (a config.json, a directory holding one, or a dict) builds a random-init encoder:
  its ``model_type`` picks the architecture, e.g. ``bert``, or RoPE encoders ``roformer`` /
  ``modernbert`` (any type that ``AutoModelForMaskedLM`` builds). The tokenizer is ``options.tokenizer`` (a
  directory or a tokenizer.json, e.g. ``retro-pipeline train-tokenizer`` output; see :func:`load_tokenizer`).
  ``vocab_size``: when the config leaves it out it is set to the tokenizer's size; when it is smaller than
  the tokenizer a :class:`UserError` says so (a larger one is kept: the extra rows are never used). The
  special-token ids a config leaves out (``pad_token_id``, and ``bos/eos/cls/sep_token_id``) are set from the
  tokenizer. The saved pooling is ``options.pooling`` or ``mean``; max_length is ``options.max_length``
  capped at the config's ``max_position_embeddings``.
- without ``model_config``, pre-training continues from ``options.model`` (its tokenizer, its masked-LM head
  when it has one, its pooling unless ``options.pooling`` says otherwise).

Rows are ``text`` rows (:func:`embedder.tasks.retromae.text_row`). Each text is masked at
``options.mlm_probability`` (0.15; 80% mask token, 10% random token, 10% unchanged; special tokens and padding
never; :func:`embedder.masking.mask_tokens`); the loss is the mean cross-entropy over the masked positions.
Only the encoder is saved (:meth:`embedder.Encoder.save`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from embedder.errors import UserError, first_line
from embedder.tasks.base import TaskOptions
from embedder.tasks.retromae import MaskedTextTask, as_tensors, encoder_tokenizer, masked_lm_batch, \
    masked_lm_loss, mlm_head, need_mask_token

# special-token names tried in order, per role (BERT / WordPiece first, then SentencePiece / RoBERTa style)
_SPECIAL_NAMES = {
    "unk_token": ("[UNK]", "<unk>"),
    "pad_token": ("[PAD]", "<pad>"),
    "cls_token": ("[CLS]", "<s>"),
    "sep_token": ("[SEP]", "</s>"),
    "mask_token": ("[MASK]", "<mask>"),
    "bos_token": ("<s>",),
    "eos_token": ("</s>",),
}
_CONFIG_IGNORED = ("architectures", "transformers_version", "_name_or_path", "model_type")


def load_tokenizer(spec: str):
    """A fast tokenizer from a directory or a tokenizer.json.

    A directory with ``tokenizer_config.json`` (what ``train-tokenizer --kind wordpiece`` and
    ``save_pretrained`` write) loads with ``AutoTokenizer`` as configured. Otherwise its (or the given)
    ``tokenizer.json`` loads with ``PreTrainedTokenizerFast(tokenizer_file=...)``, its special tokens found by
    name in its vocabulary ([UNK]/<unk>, [PAD]/<pad>, [CLS]/<s>, [SEP]/</s>, [MASK]/<mask>). A tokenizer
    without a mask token (the ``bpe`` and ``sentencepiece`` kinds of train-tokenizer have none) is rejected
    later with a clear error, by :func:`embedder.tasks.retromae.need_mask_token`.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from embedder.settings import load_errors

    path = os.path.expanduser(str(spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(path, use_fast=True)
            except load_errors() as e:
                raise UserError(f"cannot load the tokenizer '{path}' ({first_line(e)})") from None
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise UserError(f"tokenizer directory '{path}' has no tokenizer.json (nor tokenizer_config.json); pass "
                            f"the output directory of retro-pipeline train-tokenizer, or its tokenizer.json")
    elif os.path.isfile(path):
        file = path
    else:
        raise UserError(f"tokenizer '{path}' is not a file or directory; pass a tokenizer.json or a directory "
                        f"holding one (retro-pipeline train-tokenizer --output DIR)")
    try:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(file)
    except Exception as e:  # the Rust library raises a bare Exception for a bad file
        raise UserError(f"cannot read the tokenizer file '{file}' ({first_line(e)})") from None
    vocab = raw.get_vocab(with_added_tokens=True)
    specials = {}
    for role, names in _SPECIAL_NAMES.items():
        found = next((n for n in names if n in vocab), None)
        if found is not None:
            specials[role] = found
    return PreTrainedTokenizerFast(tokenizer_file=file, **specials)


def _read_config_dict(spec) -> tuple[dict, str]:
    if isinstance(spec, dict):
        return dict(spec), "model_config"
    path = os.path.expanduser(str(spec))
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"model config '{spec}' is not a config.json or a directory holding one")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model config '{path}' is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"model config '{path}' must hold a JSON object, not {type(raw).__name__}")
    return raw, path


def build_config(spec, tokenizer):
    """A transformers config from ``spec`` (see the module docstring) fitted to ``tokenizer``."""
    from transformers import AutoConfig

    from embedder.settings import load_errors

    raw, where = _read_config_dict(spec)
    model_type = raw.get("model_type")
    if not model_type:
        raise UserError(f"{where}: no 'model_type'; say which architecture to build, e.g. \"bert\", \"roformer\" "
                        f"or \"modernbert\"")
    n_tokens = len(tokenizer)
    if raw.get("vocab_size") is None:
        raw["vocab_size"] = n_tokens
    elif not isinstance(raw["vocab_size"], int) or raw["vocab_size"] < n_tokens:
        raise UserError(f"{where}: vocab_size {raw['vocab_size']!r} does not cover the tokenizer's {n_tokens} "
                        f"tokens; set it to at least {n_tokens} (or leave it out to use the tokenizer's size)")
    ids = {"pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
           "eos_token_id": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
           "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    for key, value in ids.items():
        if key not in raw and value is not None:
            raw[key] = value
    kwargs = {k: v for k, v in raw.items() if k not in _CONFIG_IGNORED}
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except load_errors() as e:
        raise UserError(f"{where}: cannot build a {model_type!r} config ({first_line(e)})") from None


def scratch_tokenizer(options: TaskOptions):
    """(tokenizer, max_length, config) of a random-init encoder: ``options.tokenizer`` (which must have a mask
    token) and ``options.model_config`` fitted to it (:func:`build_config`); max_length is
    ``options.max_length`` capped at the config's ``max_position_embeddings``."""
    tokenizer = load_tokenizer(options.tokenizer)
    need_mask_token(tokenizer, f"'{options.tokenizer}'")
    config = build_config(options.model_config, tokenizer)
    positions = getattr(config, "max_position_embeddings", None)
    limit = min(x for x in (options.max_length, positions) if x is not None)
    tokenizer.model_max_length = limit
    return tokenizer, int(limit), config


def scratch_model(config, options: TaskOptions):
    """A random-init base model (``AutoModel``) of ``config``, seeded by the caller's torch RNG."""
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
        raise UserError(f"cannot build a {config.model_type!r} encoder from model_config "
                        f"'{options.model_config}' ({first_line(e)})") from None


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


class MLMTask(MaskedTextTask):
    """mlm (see the module docstring). Options: ``model_config`` + ``tokenizer`` (from scratch) or ``model``,
    ``mlm_probability``, ``max_length``, ``pooling``."""

    name = "mlm"
    ratio_option = "mlm_probability"

    from_config = True

    def _load_tokenizer(self):
        o = self.options
        if o.model_config is None:
            tokenizer, limit = encoder_tokenizer(o.model)
            need_mask_token(tokenizer, f"'{o.model}'")
            return tokenizer, limit
        tokenizer, limit, self._config = scratch_tokenizer(o)
        return tokenizer, limit

    def build(self, device) -> MLMModel:
        from embedder.encoder import Encoder
        from embedder.settings import MODEL_FIX, resolve_model

        o = self.options
        if o.model_config is None:
            encoder = Encoder.load(o.model, pooling=o.pooling, device=device, option="--model")
            need_mask_token(encoder.tokenizer, f"'{o.model}'")
            self._tokenizer, self._limit = encoder.tokenizer, encoder.max_length
            head = mlm_head(encoder.model, resolve_model(o.model, "--model", MODEL_FIX))
            return MLMModel(encoder, head).to(device).train()
        tokenizer, limit = self.tokenizer_and_limit()
        base = scratch_model(self._config, o)
        head = mlm_head(base)
        encoder = Encoder(base, tokenizer, pooling=o.pooling or "mean", normalize=False, max_length=limit)
        return MLMModel(encoder, head).to(device).train()

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
