"""A new, random-init encoder from a config and a tokenizer (what ``--model-config`` and ``--tokenizer``
build, for the tasks that can pre-train one): :func:`load_tokenizer`, :func:`build_config` fitted to it, and
:func:`scratch_model`. The masked-LM tasks combine them in :func:`embedder.tasks.masked_lm.scratch_tokenizer`.
"""

from __future__ import annotations

import json
import os

from embedder.errors import UserError, first_line
from embedder.settings import load_errors
from embedder.tasks.base import TaskOptions

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
    later with a clear error, by :func:`embedder.tasks.masked_lm.need_mask_token`.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

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
    """A transformers config from ``spec`` (a config.json, a directory holding one, or a dict) fitted to
    ``tokenizer``: its ``model_type`` picks the architecture; ``vocab_size`` left out is the tokenizer's size,
    one smaller than the tokenizer is a :class:`UserError` (a larger one is kept); the special-token ids it
    leaves out (``pad_token_id``, ``bos/eos/cls/sep_token_id``) are the tokenizer's."""
    from transformers import AutoConfig

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


def scratch_model(config, options: TaskOptions):
    """A random-init base model (``AutoModel``) of ``config``, seeded by the caller's torch RNG."""
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
        raise UserError(f"cannot build a {config.model_type!r} encoder from model_config "
                        f"'{options.model_config}' ({first_line(e)})") from None
