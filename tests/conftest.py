"""Shared fixtures: one Ray session for the whole test run, small tokenizers and corpora (shared plain
functions are in helpers.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

pytest.register_assert_rewrite("helpers")  # before its import: its asserts explain themselves as the tests' do

# the helpers the test modules share are in helpers.py
from helpers import write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and a small object store, started once and shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 logging_level="warning", log_to_driver=True)
    yield ray
    ray.shutdown()


def _corpus_text() -> list[str]:
    """Real text that is on every machine: the Python documentation topics."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def gpt_tokenizer_path(tmp_path_factory) -> str:
    """A small byte-level BPE (GPT-style, with <|endoftext|>) trained here; returns its tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_corpus_text()[:150], vocab_size=1200, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    path = tmp_path_factory.mktemp("gpt_tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> str:
    """A small BERT WordPiece tokenizer (lower-casing, [UNK] for unknown words) in a model directory."""
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(_corpus_text()[:150], vocab_size=800, min_frequency=2, show_progress=False)
    d = tmp_path_factory.mktemp("bert")
    tok.save(str(d / "tokenizer.json"))
    return str(d)


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return _corpus_text()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, bert_dir) -> str:
    """A random-init 2-layer BERT with the WordPiece tokenizer of ``bert_dir``, saved as a HF model directory."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(f"{bert_dir}/tokenizer.json"),
                                  unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                  mask_token="[MASK]", model_max_length=128)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    d = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture()
def corpus(tmp_path, gpt_tokenizer_path, corpus_texts):
    """A 12-document Megatron corpus of real text (GPT tokens, EOD-terminated) under tmp_path/c."""
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    return write_corpus(tmp_path / "c", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts[:12])


@pytest.fixture(scope="session")
def cls_bert_dir(tmp_path_factory, tiny_bert_dir) -> str:
    """``tiny_bert_dir`` whose tokenizer adds [CLS] ... [SEP] (the conftest tokenizer has no post-processor;
    RetroMAE reads its sentence embedding at the [CLS])."""
    import shutil

    from tokenizers import Tokenizer, processors

    d = tmp_path_factory.mktemp("cls_bert") / "m"
    shutil.copytree(tiny_bert_dir, d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    tok.save(str(d / "tokenizer.json"))
    return str(d)
