"""Training helps on text it has not seen (the fast version of benchmarks/bench_train.py): through the README's
commands, `demo-pairs` (standard-library signatures -> docstrings, a quarter of the modules held out), `train`
and `evaluate`, on the held-out modules only."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from retro_pipeline.cli import cli


def _invoke(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def _mrr(model, pairs) -> float:
    args = ["evaluate", "--eval-file", str(pairs / "test.jsonl"), "--json"]
    r = _invoke(args + (["--model", str(model)] if model else []))
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["n_queries"] == len({json.loads(line)["query"] for line in open(pairs / "test.jsonl")})
    return metrics["mrr@10"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    _invoke(["demo-pairs", "--output-dir", str(d)])
    train = [json.loads(line) for line in open(d / "train.jsonl")]
    test = [json.loads(line) for line in open(d / "test.jsonl")]
    assert len(train) > 1000 and len(test) > 300
    assert not {r["pos"] for r in train} & {r["pos"] for r in test}   # no held-out document is trained on
    return d


def test_contrastive_fine_tuning_raises_minilm_held_out_mrr(tmp_path, pairs):
    before = _mrr(None, pairs)                          # the packaged MiniLM as it ships
    out = tmp_path / "enc"
    _invoke(["train", "--task", "contrastive", "--train-file", str(pairs / "train.jsonl"), "--output-dir", str(out),
             "--max-steps", str(STEPS_MINILM), "--batch-size", "32", "--lr", "3e-5", "--warmup-ratio", "0.1",
             "--max-length", "128", "--no-progress"])
    after = _mrr(out, pairs)
    assert after >= before + MINILM_GAIN, (before, after)


STEPS_MINILM = 30
MINILM_GAIN = 0.01
