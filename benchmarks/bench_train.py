"""Real data, real gain: does training the encoder improve retrieval on text it has not seen?

Data (every machine has it): query → document pairs from the Python standard library
(:func:`retro_pipeline.demo.demo_query_pairs`: a function's name and signature → its docstring), split by
module: a seeded quarter of the modules is held out, so no test document (or its module) is trained on.
Evaluation: MRR@10, Recall@1/10 and nDCG@10 of the held-out queries by exact search over the held-out
documents (:func:`embedder.evaluate.evaluate`).

1. The packaged all-MiniLM-L6-v2 as it ships, then after contrastive fine-tuning (InfoNCE, in-batch
   negatives) on the training pairs.
2. A small random-init BERT (MiniLM's WordPiece vocabulary) fine-tuned contrastively from scratch, against
   the same model pre-trained with RetroMAE on the training documents first, then fine-tuned the same way.

    python benchmarks/bench_train.py --out /tmp/bench_train            # the figures in RESULTS.md
    python benchmarks/bench_train.py --out /tmp/bench_train --quick    # minutes: smaller runs
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from embedder import Encoder, default_model_path
from embedder.evaluate import evaluate
from embedder.tasks.base import TaskOptions
from embedder.trainer import TrainConfig, train
from retro_pipeline.demo import demo_query_pairs


def split_by_module(pairs: list[dict], test_share: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    modules = sorted({p["module"] for p in pairs})
    rng = np.random.default_rng(seed)
    test = set(rng.choice(modules, size=max(1, round(test_share * len(modules))), replace=False).tolist())
    return [p for p in pairs if p["module"] not in test], [p for p in pairs if p["module"] in test]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def random_bert(out: str, hidden: int, layers: int) -> str:
    """A random-init BERT with the packaged MiniLM's tokenizer, saved as an encoder directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                                 max_position_embeddings=512))
    Encoder(model, tok, pooling="cls").save(out)
    return out


def score(model_dir: str, test: list[dict]) -> dict:
    enc = Encoder.load(model_dir, device="cpu")
    m = evaluate(enc, test, k=10)
    return {k: round(float(v), 4) for k, v in m.items()}


def run(task: str, model: str, train_file: str, out: str, steps: int, batch: int, lr: float, **opt) -> float:
    t0 = time.perf_counter()
    train(TrainConfig(task=task, train_file=train_file, output_dir=out, lr=lr, max_steps=steps, batch_size=batch,
                      warmup_ratio=0.1, seed=0, progress=False,
                      options=TaskOptions(model=model, **opt)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not the recorded figures)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    q = args.quick
    pairs = demo_query_pairs()
    train_rows, test = split_by_module(pairs)
    train_file = write_jsonl(os.path.join(args.out, "train.jsonl"),
                             [{"query": p["query"], "pos": p["pos"]} for p in train_rows])
    docs_file = write_jsonl(os.path.join(args.out, "docs.jsonl"), [{"text": p["pos"]} for p in train_rows])
    print(f"{len(pairs)} pairs from {len({p['module'] for p in pairs})} modules: {len(train_rows)} train, "
          f"{len(test)} held-out (by module)")
    results = {}

    # 1. the packaged MiniLM: as shipped, then fine-tuned
    minilm = default_model_path()
    results["MiniLM as shipped"] = score(minilm, test)
    out = os.path.join(args.out, "minilm_contrastive")
    secs = run("contrastive", minilm, train_file, out, steps=10 if q else 80, batch=32, lr=3e-5, max_length=128)
    results["MiniLM + contrastive"] = {**score(out, test), "train_s": round(secs)}

    # 2. a small random-init BERT: contrastive alone vs RetroMAE pre-training first
    init = random_bert(os.path.join(args.out, "random_bert"), hidden=256, layers=4)
    steps = 40 if q else 300
    out = os.path.join(args.out, "random_contrastive")
    secs = run("contrastive", init, train_file, out, steps=steps, batch=32, lr=1e-4, max_length=128)
    results["random BERT + contrastive"] = {**score(out, test), "train_s": round(secs)}
    pre = os.path.join(args.out, "random_retromae")
    secs_pre = run("retromae", init, docs_file, pre, steps=100 if q else 1000, batch=32, lr=2e-4, max_length=128)
    out = os.path.join(args.out, "random_retromae_contrastive")
    secs = run("contrastive", pre, train_file, out, steps=steps, batch=32, lr=1e-4, max_length=128)
    results["random BERT + RetroMAE + contrastive"] = {**score(out, test), "train_s": round(secs + secs_pre)}

    print(f"\n{'model':40s} {'MRR@10':>7s} {'R@1':>6s} {'R@10':>6s} {'nDCG@10':>8s} {'train s':>8s}")
    for name, m in results.items():
        print(f"{name:40s} {m['mrr@10']:7.4f} {m['recall@1']:6.4f} {m['recall@10']:6.4f} {m['ndcg@10']:8.4f} "
              f"{m.get('train_s', ''):>8}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
