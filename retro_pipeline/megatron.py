"""What Megatron-LM's RETRO training reads from a workdir besides the neighbors: config.json's keys and the
tokenizer files they name (docs/formats.md §4).

Megatron-LM's ``load_retro_args`` (``megatron/training/arguments.py``) reads config.json and overrides the
training arguments with it: the data path (each prefix joined to ``<workdir>/data``; an absolute prefix stays
as it is), the seed, sequence length, sample counts and batch size, the GPT tokenizer (type, and files joined
to the workdir) and the neighbor directories. The GPT tokenizer is written where Megatron can build it:

- the GPT-2 BPE (``--gpt-tokenizer gpt2``, or a directory of ``vocab.json``/``merges.txt`` or
  ``encoder.json``/``vocab.bpe``): ``GPT2BPETokenizer`` with ``megatron/gpt2-vocab.json`` and
  ``megatron/gpt2-merges.txt``;
- any other tokenizer: ``HuggingFaceTokenizer`` with ``megatron/gpt_tokenizer/`` (a transformers
  directory whose ``eos_token`` is the corpora's end-of-document token, which Megatron uses as EOD).

The embedder's vocabulary is ``megatron/bert-vocab.txt`` (``BertWordPieceLowerCase`` or
``BertWordPieceCase`` by its normalizer): Megatron's training only carries these two keys along.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from retro_pipeline.io import atomic_path
from retro_pipeline.samples import megatron_data_path

DIR = "megatron"  # under the workdir


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write(dst: Path, text: str) -> None:
    with atomic_path(dst) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def gpt2_bpe_files(spec: str) -> tuple[Path, Path] | None:
    """(vocab, merges) when the GPT tokenizer is a GPT-2 BPE given as files, else None."""
    from retro_pipeline.tokenizers import _gpt2_files

    if spec.strip().lower() == "gpt2" and not Path(spec).expanduser().exists():
        return _gpt2_files()
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).is_file() and (path / merges).is_file():
                return path / vocab, path / merges
    return None


def gpt_tokenizer_keys(root: Path, spec: str) -> dict[str, Any]:
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    files = gpt2_bpe_files(spec)
    if files is not None:
        _copy(files[0], root / DIR / "gpt2-vocab.json")
        _copy(files[1], root / DIR / "gpt2-merges.txt")
        return {"retro_gpt_tokenizer_type": "GPT2BPETokenizer", "retro_gpt_vocab_file": f"{DIR}/gpt2-vocab.json",
                "retro_gpt_merge_file": f"{DIR}/gpt2-merges.txt", "retro_gpt_tokenizer_model": None}
    import tempfile

    import transformers

    gpt = load_gpt_tokenizer(spec)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=gpt.tokenizer,
                                                eos_token=gpt.tokenizer.id_to_token(gpt.eod_id))
    out = root / DIR / "gpt_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gpt_tokenizer-") as tmp:
        fast.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            _copy(Path(tmp) / name, out / name)
    return {"retro_gpt_tokenizer_type": "HuggingFaceTokenizer", "retro_gpt_vocab_file": None,
            "retro_gpt_merge_file": None, "retro_gpt_tokenizer_model": f"{DIR}/gpt_tokenizer"}


def bert_tokenizer_keys(root: Path, embedder_spec) -> dict[str, Any]:
    from retro_pipeline.tokenizers import load_embedder_tokenizer

    tok = load_embedder_tokenizer(embedder_spec)
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    _write(root / DIR / "bert-vocab.txt", "".join(f"{t}\n" for t, _ in by_id))
    lower = tok.normalizer is not None and tok.normalizer.normalize_str("Ab") == "ab"
    return {"retro_bert_tokenizer_type": "BertWordPieceLowerCase" if lower else "BertWordPieceCase",
            "retro_bert_vocab_file": f"{DIR}/bert-vocab.txt"}


def megatron_config(workdir, cfg, built: dict[str, Any]) -> dict[str, Any]:
    """Every key Megatron-LM's ``load_retro_args`` reads, for this build; writes the tokenizer files.

    ``built`` holds what query-neighbors decided: ``train_samples`` and ``eval_iters`` (resolved to numbers),
    ``block_size`` (rows per query file) and
    ``neighbor_dirs`` ({split: directory name under query/, or None where the split has zero width})."""
    root = workdir.root
    return {
        "retro_gpt_data_path": megatron_data_path(cfg.data_path),
        "retro_gpt_data_cache_path": None,
        "retro_gpt_split": cfg.split,
        "retro_gpt_seed": cfg.seed,
        "retro_gpt_seq_length": cfg.seq_length,
        "retro_gpt_chunk_length": cfg.chunk_length,
        "retro_gpt_train_samples": built["train_samples"],
        "retro_gpt_eval_interval": cfg.eval_interval,
        "retro_gpt_eval_iters": built["eval_iters"],
        "retro_gpt_global_batch_size": cfg.global_batch_size,
        **gpt_tokenizer_keys(root, cfg.gpt_tokenizer),
        **bert_tokenizer_keys(root, cfg.embedder_spec()),
        "retro_block_size": built["block_size"],
        "retro_neighbor_dirs": built["neighbor_dirs"],
    }
