"""The one encoder: a Hugging Face transformer + pooling (+ L2 normalisation) as a ``torch.nn.Module``.

The pipeline embeds chunks with :meth:`Encoder.encode`; every training task trains this same module and saves
it with :meth:`Encoder.save`, so a trained checkpoint plugs straight into a build.

Where settings come from (first match wins, per setting):

1. the arguments of :meth:`Encoder.load`;
2. ``retro_pooling.json`` in the model directory (``{"pooling", "normalize", "max_length"}``, written by
   :meth:`Encoder.save`);
3. sentence-transformers metadata: ``modules.json`` (a ``Normalize`` module means ``normalize=True``, its
   absence ``False``), the pooling module's ``config.json`` (cls or mean) and ``sentence_bert_config.json``
   (``max_seq_length``);
4. defaults: pooling ``"mean"``, normalize ``False``, max_length
   ``min(tokenizer.model_max_length, config.max_position_embeddings, 512)``.

Poolings (all over the final hidden states, computed in float32):

- ``cls``: the first token.
- ``mean``: the mean over attended tokens, [CLS] and [SEP] included (sentence-transformers' mean).
- ``mean-no-special``: the mean over attended tokens that the special-tokens mask does not mark (the
  [CLS]/[SEP] the tokenizer adds; padding is unattended anyway), Megatron's BERT embedding. A row with no such
  token (an empty text is just ``[CLS] [SEP]``) pools to the zero vector, as in Megatron (which zeroes its
  NaN), and stays zero after normalisation.

Precision: the weights stay float32. On CUDA, :meth:`Encoder.encode` runs under fp16 (default) or bf16
autocast; on CPU it runs in float32 unless a half dtype is asked for explicitly, which is then honoured with
CPU autocast (correct, but rarely faster than float32 on CPUs without AMX). Pooling is always float32.

Determinism: :meth:`Encoder.encode` forms its batches as a function of the input list only (token lengths,
``batch_size``, ``batch_tokens``, ``sort_by_length``; :meth:`Encoder.plan_batches`), so a list of texts is
computed the same way whichever process runs it: with the same hardware, library versions and settings its
embeddings are the same bit for bit. Across different batchings they agree to float noise only (~1e-7 in
float32 on CPU): a batch's shape (rows x padded width) can change how kernels order floating-point sums.
Measured on CPU in float32: one width's rows at batch sizes 1-40 match the bits of a batch of 40 only for some
sizes, so only the same batches give the same bits. Sequences are padded to the next multiple of 8 of their
own length (at most 7 tokens of padding whatever the batch), never to a batch-mate's length.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from embedder.atomic import atomic_dir
from embedder.errors import UserError, first_line
from embedder.settings import (DTYPE_ALIASES, DTYPE_NAMES, EMBEDDER_FIX, MODEL_FIX, POOLINGS, SETTINGS_FILE,
                               check_model_dir, default_max_length, load_errors, no_hf_bars, read_settings,
                               resolve_model)

# Sequences are padded to a multiple of this (a function of their own length; tensor cores want it too).
PAD_MULTIPLE = 8
# Padded tokens per batch by default. CPU: measured on 1 and 2 threads (MiniLM-L6 and a BERT-base shape, width
# 64): 512-2048 tokens are within 3% of each other, larger batches fall off (cache); 1024 is the best for the
# BERT-base shape. CUDA: large enough to fill a GPU with a BERT-base-sized encoder (not measured here).
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 32768}
_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_DTYPES.update({alias: _DTYPES[name] for alias, name in DTYPE_ALIASES.items()})


def resolve_dtype(dtype) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or a name ("float16", "bf16", ...) -> ``torch.dtype`` (or ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise UserError(f"unknown embedder dtype '{dtype}'; use one of {', '.join(DTYPE_NAMES)}")
    return _DTYPES[str(dtype)]


def pad_id(tokenizer) -> int:
    """The id a tokenizer's sequences are padded with: its padding token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_right(ids: Sequence[Sequence[int]], pad: int, width: int | None = None,
              special: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Token id lists -> right-padded int64 arrays [B, width] (width: the longest list, at least 1): ``ids``
    (``pad`` after each list), ``attention`` (1 at the tokens, 0 at padding) and, when ``special`` (the lists'
    special-tokens masks) is given, the special-tokens mask with the padding marked special (1), else None.
    The one padding of the encoder and of the training tasks."""
    width = max(1, max((len(x) for x in ids), default=0)) if width is None else width
    out = np.full((len(ids), width), pad, dtype=np.int64)
    attention = np.zeros((len(ids), width), dtype=np.int64)
    marks = None if special is None else np.ones((len(ids), width), dtype=np.int64)
    for i, x in enumerate(ids):
        n = len(x)
        out[i, :n] = x
        attention[i, :n] = 1
        if marks is not None:
            marks[i, :n] = special[i]
    return out, attention, marks


class Encoder(torch.nn.Module):
    """A transformer encoder whose ``forward`` maps token ids to one pooled vector per sequence.

    Build it with :meth:`Encoder.load`; the constructor takes an already loaded model and tokenizer.
    ``compute_dtype`` is the autocast dtype used by :meth:`encode` (float32 means no autocast); the weights
    themselves stay float32.
    """

    def __init__(self, model, tokenizer, pooling: str = "mean", normalize: bool = False, max_length: int = 512,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling '{pooling}'; use one of {', '.join(POOLINGS)}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(max_length, int) or max_length < 2 or (limit is not None and max_length > limit):
            raise UserError(f"embedder max_length={max_length!r} is out of range; use an integer from 2 to "
                             f"{limit} (the model's max_position_embeddings)")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = max_length
        self.compute_dtype = compute_dtype
        # Token ids that mean-no-special leaves out: the ones the tokenizer adds around a text, and padding.
        special = {getattr(tokenizer, f"{t}_token_id", None) for t in ("cls", "sep", "pad", "bos", "eos")}
        self.register_buffer("special_ids", torch.tensor(sorted(i for i in special if i is not None), dtype=torch.long),
                             persistent=False)
        self.pad_id = pad_id(tokenizer)

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, pooling: str | None = None,
             normalize: bool | None = None, max_length: int | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, num_threads: int | None = None,
             option: str | None = None) -> "Encoder":
        """Load a Hugging Face encoder: a directory, or a hub id (``None`` is the packaged MiniLM).

        A hub id is resolved by :func:`embedder.settings.resolve_model`: when the hub cannot be reached this
        fails at once (the packaged model's own ids fall back to the packaged copy). A directory must hold
        the model (config.json + weights) and its tokenizer; anything that cannot load is a one-line
        :class:`UserError`.

        ``device`` None means "cuda" when available, else "cpu". ``dtype`` is the compute dtype of
        :meth:`encode`: None means float16 on CUDA and float32 on CPU; float16/bfloat16 run under autocast
        (on CPU too when asked for explicitly, which is rarely faster). ``num_threads`` sets torch's CPU
        thread count for the process (None leaves it alone). ``option`` is the command-line option that named
        ``model`` when it is not ``--embedder`` (e.g. "--model"): errors then name it, and the fix in its terms.
        transformers' weight-loading bar is not shown.
        """
        from transformers import AutoModel, AutoTokenizer

        dtype = resolve_dtype(dtype)
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        what = option or "embedder"
        fix = None if option is None else MODEL_FIX if option == "--model" else \
            f"pass a train --output-dir, a model directory (config.json, weights, tokenizer) or a hub id as {option}"
        name = resolve_model(model, what, fix or EMBEDDER_FIX)
        if os.path.exists(name):
            check_model_dir(name, what, fix)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        for part in ("model", "tokenizer"):
            try:
                if part == "model":
                    with no_hf_bars():
                        hf_model = AutoModel.from_pretrained(name, dtype=torch.float32)
                else:
                    tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
            except load_errors() as e:
                raise UserError(f"cannot load the {part} of {what} '{name}' ({first_line(e)}); " + (
                    fix or "pass a directory holding a Hugging Face model (config.json, weights, tokenizer) or a "
                           "hub id")) from None
        if not getattr(tokenizer, "is_fast", True):
            raise UserError(f"the tokenizer of '{name}' has no fast (Rust) version; convert it with "
                             "AutoTokenizer.from_pretrained(...).save_pretrained(...) after installing tokenizers")

        found = read_settings(name)
        explicit = {"pooling": pooling, "normalize": normalize, "max_length": max_length}
        settings = {k: v if v is not None else found.get(k) for k, v in explicit.items()}
        if settings["pooling"] is not None and settings["pooling"] not in POOLINGS:
            raise UserError(f"{name}: the saved pooling {settings['pooling']!r} is not supported; pass "
                             f"pooling= one of {', '.join(POOLINGS)} explicitly")
        if settings["max_length"] is None:
            settings["max_length"] = default_max_length(tokenizer, hf_model.config)
        encoder = cls(hf_model, tokenizer, pooling=settings["pooling"] or "mean",
                      normalize=bool(settings["normalize"]), max_length=int(settings["max_length"]),
                      compute_dtype=dtype)
        return encoder.to(device).eval()

    def save(self, path: str | os.PathLike) -> None:
        """Save model + tokenizer (Hugging Face format, safetensors), ``retro_pooling.json``, and the
        sentence-transformers files (modules.json, 1_Pooling/, sentence_bert_config.json) so that
        ``SentenceTransformer(path)`` gives the same embeddings. ``mean-no-special`` has no
        sentence-transformers equivalent, so for it those files are not written (and a warning says so).

        Atomic as a whole: everything is written into ``<path>.tmp-<pid>`` beside it, fsynced, then moved
        into place, so ``path`` is never a half-saved model. An existing ``path`` is replaced as a whole
        (renamed aside to ``<path>.old-<pid>``, the new one renamed in, the old one deleted): files of
        its own that are not part of a model do not survive.
        """
        path = Path(os.path.abspath(path))
        if path.exists() and not path.is_dir():
            raise UserError(f"cannot save the embedder to '{path}': it exists and is not a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.pooling not in ("cls", "mean"):
            warnings.warn(f"pooling '{self.pooling}' has no sentence-transformers equivalent: {path} loads "
                          "with embedder.Encoder.load only", stacklevel=2)
        with atomic_dir(path) as tmp:
            self._write(tmp)

    def _write(self, path: Path) -> None:
        """Every file of :meth:`save`, into the (new, empty) directory ``path``."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        files = {SETTINGS_FILE: {"pooling": self.pooling, "normalize": self.normalize,
                                 "max_length": self.max_length}}
        if self.pooling in ("cls", "mean"):
            modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
            if self.normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": "sentence_transformers.models.Normalize"})
                files["2_Normalize/config.json"] = {}
            files["modules.json"] = modules
            files["sentence_bert_config.json"] = {"max_seq_length": self.max_length, "do_lower_case": False}
            files["1_Pooling/config.json"] = {
                "word_embedding_dimension": self.dim,
                "pooling_mode_cls_token": self.pooling == "cls",
                "pooling_mode_mean_tokens": self.pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        for rel, obj in files.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(path / rel, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)

    # ------------------------------------------------------------------ the model

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.special_ids.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                special_tokens_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] token ids and mask (1 = token, 0 = padding) -> [B, dim] float32 pooled vectors.

        ``special_tokens_mask`` (1 = special) matters for ``mean-no-special`` only; when None it is derived
        from the ids (the tokenizer's [CLS]/[SEP]/[PAD]/BOS/EOS ids).
        """
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()  # [B, L, D]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.bool()
            if self.pooling == "mean-no-special":
                if special_tokens_mask is None:
                    special_tokens_mask = torch.isin(input_ids, self.special_ids)
                mask = mask & ~special_tokens_mask.bool()
            mask = mask.unsqueeze(-1).to(hidden.dtype)                               # [B, L, 1]
            # a row with no token to average (only possible for mean-no-special) is sum 0 / 1 = the zero vector
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)    # [B, D]
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    # ------------------------------------------------------------------ batched inference

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> token id lists with special tokens, truncated to ``max_length`` (one fast-tokenizer call)."""
        return self._tokenize(texts, special_tokens_mask=False)[0]

    def _tokenize(self, texts: Sequence[str], special_tokens_mask: bool):
        if len(texts) == 0:
            return [], ([] if special_tokens_mask else None)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False,
                             return_special_tokens_mask=special_tokens_mask)
        return enc["input_ids"], enc.get("special_tokens_mask")

    def encode(self, texts: Sequence[str], batch_size: int | None = None, sort_by_length: bool = True,
               progress: bool = False, batch_tokens: int | None = None) -> np.ndarray:
        """Texts -> float32 [n, dim] embeddings, in input order (batching: :meth:`encode_ids`).

        For ``mean-no-special`` the tokenizer's own special-tokens mask is used: a literal "[SEP]" inside a
        text is content, as in Megatron (which drops the first and last position).
        """
        ids, special = self._tokenize(texts, special_tokens_mask=self.pooling == "mean-no-special")
        return self.encode_ids(ids, batch_size, sort_by_length, progress, special_tokens_masks=special,
                               batch_tokens=batch_tokens)

    def default_batch_tokens(self) -> int:
        """The padded tokens per batch :meth:`encode_ids` uses by default on this encoder's device."""
        return DEFAULT_BATCH_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]

    def plan_batches(self, lengths: np.ndarray, batch_size: int | None = None, batch_tokens: int | None = None,
                     sort_by_length: bool = True) -> list[tuple[np.ndarray, int]]:
        """(rows, padded width) of each batch :meth:`encode_ids` runs for sequences of ``lengths``.

        Every sequence is padded to the next multiple of :data:`PAD_MULTIPLE` of its own length (at most
        ``max_length``), a function of its own length only. Sorted (the default): batches
        hold consecutive items of the order by padded width (widest first, ties in input order), never two
        widths in one batch, each at most ``batch_tokens`` padded tokens (at least one row) and at most
        ``batch_size`` rows. Unsorted: consecutive items in input order under the same caps, padded to the
        batch's widest.
        """
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise UserError(f"embedder batch_size={batch_size!r} must be a positive integer")
        if batch_tokens is None:
            batch_tokens = self.default_batch_tokens()
        if not isinstance(batch_tokens, (int, np.integer)) or batch_tokens < 1:
            raise UserError(f"embedder batch_tokens={batch_tokens!r} must be a positive integer")
        n = len(lengths)
        lengths = np.asarray(lengths, dtype=np.int64)
        widths = np.minimum(-(-lengths // PAD_MULTIPLE) * PAD_MULTIPLE, np.maximum(self.max_length, lengths))
        order = np.argsort(-widths, kind="stable") if sort_by_length else np.arange(n)
        cap = batch_size or n or 1
        batches: list[tuple[np.ndarray, int]] = []
        i = 0
        while i < n:
            width = int(widths[order[i]])
            j = i + 1
            while j < n and j - i < cap:
                w = int(widths[order[j]])
                if (sort_by_length and w != width) or max(width, w) * (j - i + 1) > batch_tokens:
                    break
                width = max(width, w)
                j += 1
            batches.append((order[i:j], width))
            i = j
        return batches

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None, sort_by_length: bool = True,
                   progress: bool = False, special_tokens_masks: Sequence[Sequence[int]] | None = None,
                   batch_tokens: int | None = None) -> np.ndarray:
        """Token id lists (as :meth:`tokenize` makes them: special tokens included, at most ``max_length``
        long) -> float32 [n, dim] embeddings, in input order.

        ``special_tokens_masks`` (1 = special, same shapes as ``ids``) is used by ``mean-no-special`` only;
        without it the special tokens are the [CLS]/[SEP]/[PAD]/BOS/EOS ids wherever they occur.

        Batches (:meth:`plan_batches`): sequences padded to the next multiple of 8 of their own length,
        sorted by that width, batches of one width filled to ``batch_tokens`` padded tokens (default
        :meth:`default_batch_tokens`: the device's sweet spot) and at most ``batch_size`` rows (default: no
        cap). Padding is then at most 7 tokens a sequence however the input is cut, and every sequence is
        computed at a width that depends on its own length only.
        On CUDA the host batches are pinned and copied asynchronously, and the results stay on the device
        until the end, so the CPU prepares batch k+1 while the GPU runs batch k.
        """
        n = len(ids)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        if n and lengths.max() > self.max_length:
            raise UserError(f"encode_ids got a sequence of {lengths.max()} tokens, more than max_length="
                             f"{self.max_length}; truncate with Encoder.tokenize or raise max_length")
        if n and lengths.min() == 0:
            raise UserError("encode_ids got an empty token list; a text tokenizes to at least [CLS] [SEP]")
        if self.pooling != "mean-no-special":
            special_tokens_masks = None
        batches = self.plan_batches(lengths, batch_size, batch_tokens, sort_by_length)
        device, cuda = self.device, self.device.type == "cuda"
        out = torch.empty(n, self.dim, dtype=torch.float32, device=device)  # filled in place, read back once
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="embed", unit="batch")
        for rows, width in batches:
            input_ids, attention_mask, special = pad_right(                         # [b, width] each
                [ids[j] for j in rows], self.pad_id, width,
                None if special_tokens_masks is None else [special_tokens_masks[j] for j in rows])
            batch = [torch.from_numpy(a) for a in (rows, input_ids, attention_mask, special) if a is not None]
            if cuda:
                batch = [t.pin_memory().to(device, non_blocking=True) for t in batch]
            with torch.autocast(device.type, dtype=self.compute_dtype,
                                enabled=self.compute_dtype != torch.float32):
                out[batch[0]] = self(*batch[1:])
        return out.cpu().numpy()
