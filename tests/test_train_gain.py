"""Training helps on text it has not seen (the fast version of benchmarks/bench_train.py): through the README's
commands, `demo-pairs` (standard-library signatures -> docstrings, a quarter of the modules held out, and
pre-training text from none of them), `train-tokenizer`, `train` and `evaluate`, on the held-out modules only."""

from __future__ import annotations

import json

import pytest

from helpers import invoke_ok

pytestmark = pytest.mark.slow  # training to a measured gain: minutes


def _mrr(model, pairs) -> float:
    args = ["evaluate", "--eval-file", str(pairs / "test.jsonl"), "--json"]
    r = invoke_ok(*args + (["--model", str(model)] if model else []))
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["n_queries"] == len({json.loads(line)["query"] for line in open(pairs / "test.jsonl")})
    return metrics["mrr@10"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    invoke_ok("demo-pairs", "--output-dir", str(d))
    train = [json.loads(line) for line in open(d / "train.jsonl")]
    test = [json.loads(line) for line in open(d / "test.jsonl")]
    assert len(train) > 1000 and len(test) > 300
    assert not {r["pos"] for r in train} & {r["pos"] for r in test}   # no held-out document is trained on
    passages = [json.loads(line)["text"] for line in open(d / "pretrain.jsonl")]
    assert len(passages) > 10000 and max(len(p.split()) for p in passages) == 80
    text = " ".join(passages)
    assert " ".join(train[0]["pos"].split()[:12]) in text          # the training documents are in it ...
    opening = [" ".join(r["pos"].split()[:12]) for r in test if len(r["pos"].split()) >= 12]
    leaked = [o for o in opening if o in text]   # ... held-out ones only where another module repeats them
    assert len(leaked) <= 0.02 * len(opening), leaked
    return d


def test_contrastive_fine_tuning_raises_minilm_held_out_mrr(tmp_path, pairs):
    before = _mrr(None, pairs)                          # the packaged MiniLM as it ships
    out = tmp_path / "enc"
    invoke_ok("train", "--task", "contrastive", "--train-file", str(pairs / "train.jsonl"), "--output-dir", str(out),
              "--max-steps", str(STEPS_MINILM), "--batch-size", "32", "--lr", "3e-5", "--warmup-ratio", "0.1",
              "--max-length", "128", "--no-progress")
    after = _mrr(out, pairs)
    assert after >= before + MINILM_GAIN, (before, after)


STEPS_MINILM = 30
MINILM_GAIN = 0.01


def _random_bert(out, tokenizer_dir):
    """A random-init BERT (hidden 64, one layer, CLS pooling) on the trained WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    from embedder import Encoder
    from embedder.tasks.mlm import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                 intermediate_size=256, max_position_embeddings=512))
    Encoder(model, tok, pooling="cls").save(str(out))
    return out


def test_retromae_pre_training_beats_contrastive_alone_on_a_random_bert(tmp_path, pairs):
    invoke_ok("train-tokenizer", "--input", str(pairs / "pretrain.jsonl"), "--output", str(tmp_path / "tok"),
              "--vocab-size", "2000", "--kind", "wordpiece")
    init = _random_bert(tmp_path / "init", tmp_path / "tok")
    common = ["--max-length", "64", "--warmup-ratio", "0.1", "--no-progress"]
    pre = tmp_path / "retromae"
    invoke_ok("train", "--task", "retromae", "--model", str(init), "--train-file", str(pairs / "pretrain.jsonl"),
              "--output-dir", str(pre), "--max-steps", str(STEPS_RETROMAE), "--batch-size", "64", "--lr", "2e-3",
              *common)
    mrr = {}
    for name, start in (("alone", init), ("retromae", pre)):
        out = tmp_path / f"{name}_contrastive"
        invoke_ok("train", "--task", "contrastive", "--model", str(start), "--train-file", str(pairs / "train.jsonl"),
                  "--output-dir", str(out), "--max-steps", "120", "--batch-size", "32", "--lr", "1e-3", *common)
        mrr[name] = _mrr(out, pairs)
    assert mrr["retromae"] >= mrr["alone"] + RETROMAE_GAIN, mrr


STEPS_RETROMAE = 1000
RETROMAE_GAIN = 0.05
