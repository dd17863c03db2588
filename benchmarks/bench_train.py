"""Real data, real gain: does training the encoder improve retrieval on text it has not seen?

Data (every machine has it): query → document pairs from the Python standard library
(:func:`retro_pipeline.demo.demo_query_pairs`: a function's name and signature → its docstring), split by
module: a seeded quarter of the modules is held out, so no test document (or its module) is trained on.
Evaluation: MRR@10, Recall@1/10 and nDCG@10 of the held-out queries by exact search over the held-out
documents (:func:`embedder.evaluate.evaluate`).

1. The packaged all-MiniLM-L6-v2 as it ships, then after contrastive fine-tuning (InfoNCE, in-batch
   negatives) on the training pairs.
2. A small random-init BERT (hidden 128, 2 layers, CLS pooling, a WordPiece vocabulary trained on the
   pre-training text) fine-tuned contrastively from scratch, against the same model pre-trained with RetroMAE
   first, then fine-tuned the same way. The pre-training text
   (:func:`retro_pipeline.demo.demo_pretrain_passages`) is the pydoc topics, the training documents and the
   standard library's source files, none of it from a held-out module.

    python benchmarks/bench_train.py --out /tmp/bench_train            # the figures in RESULTS.md
    python benchmarks/bench_train.py --out /tmp/bench_train --quick    # minutes: smaller runs
    ... --reuse                                                        # keep finished runs of the same settings
    ... --part random                                                  # part 2 only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from embedder import Encoder, default_model_path
from embedder.evaluate import evaluate
from embedder.tasks.base import TaskOptions
from embedder.trainer import TrainConfig, train
from retro_pipeline.demo import demo_pretrain_passages, demo_query_pairs, split_by_module


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def random_bert(out: str, text_file: str, hidden: int, layers: int, vocab_size: int = 8000) -> str:
    """A random-init BERT (CLS pooling) with a WordPiece tokenizer trained on ``text_file``, saved as an encoder
    directory."""
    import torch
    from transformers import BertConfig, BertModel

    from embedder.tasks.mlm import load_tokenizer
    from retro_pipeline.tokenizers import train_tokenizer

    tok_dir = out + "_tokenizer"
    if not (REUSE and os.path.exists(os.path.join(tok_dir, "tokenizer.json"))):
        train_tokenizer([text_file], tok_dir, vocab_size=vocab_size, kind="wordpiece")
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                                 max_position_embeddings=512))
    Encoder(model, tok, pooling="cls").save(out)
    return out


RR: dict[str, np.ndarray] = {}          # per held-out query reciprocal ranks, for the paired comparisons


def score(name: str, model_dir: str, test: list[dict]) -> dict:
    enc = Encoder.load(model_dir, device="cpu")
    m = evaluate(enc, test, k=10, per_query=True)
    RR[name] = np.asarray(m.pop("rr@10"))
    return {k: round(float(v), 4) for k, v in m.items()}


def paired(a: str, b: str, rounds: int = 10000, seed: int = 0) -> str:
    """MRR@10 of b minus a, with a 95% paired bootstrap interval over the held-out queries and the share of
    queries b ranks better / worse."""
    d = RR[b] - RR[a]
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(rounds, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (f"{b} - {a}: MRR@10 {d.mean():+.4f} (95% paired bootstrap [{lo:+.4f}, {hi:+.4f}]; "
            f"better on {(d > 0).mean():.1%} of queries, worse on {(d < 0).mean():.1%})")


REUSE = False
SECONDS = "bench_seconds.json"   # beside a finished run: its training time, for --reuse


def run(task: str, model: str, train_file: str, out: str, steps: int, batch: int, lr: float, **opt) -> float:
    """Train; return the seconds it took. With --reuse, a finished run of ``out`` with the same settings (its
    training_args.json) is kept and its recorded seconds returned."""
    cfg = TrainConfig(task=task, train_file=train_file, output_dir=out, lr=lr, max_steps=steps, batch_size=batch,
                      warmup_ratio=0.1, seed=0, progress=False, options=TaskOptions(model=model, **opt))
    if REUSE and os.path.exists(os.path.join(out, SECONDS)):
        with open(os.path.join(out, "training_args.json")) as f:
            done = json.load(f)
        want = dataclasses.asdict(cfg)
        if all(done.get(k) == want[k] for k in ("task", "lr", "max_steps", "batch_size", "warmup_ratio", "seed")) \
                and done["options"].get("model") == model and os.path.abspath(done["train_file"]) == \
                os.path.abspath(train_file):
            with open(os.path.join(out, SECONDS)) as f:
                return json.load(f)["seconds"]
    t0 = time.perf_counter()
    train(cfg)
    secs = time.perf_counter() - t0
    with open(os.path.join(out, SECONDS), "w") as f:
        json.dump({"seconds": secs}, f)
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not the recorded figures)")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs under --out that had the same settings")
    ap.add_argument("--part", choices=("all", "minilm", "random"), default="all",
                    help="run part 1 (the packaged MiniLM), part 2 (the random-init BERT) or both")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    q = args.quick
    pairs = demo_query_pairs()
    train_rows, test = split_by_module(pairs)
    train_file = write_jsonl(os.path.join(args.out, "train.jsonl"),
                             [{"query": p["query"], "pos": p["pos"]} for p in train_rows])
    print(f"{len(pairs)} pairs from {len({p['module'] for p in pairs})} modules: {len(train_rows)} train, "
          f"{len(test)} held-out (by module)")
    results = {}

    # 1. the packaged MiniLM: as shipped, then fine-tuned
    comparisons = []
    if args.part in ("all", "minilm"):
        minilm = default_model_path()
        results["MiniLM as shipped"] = score("MiniLM as shipped", minilm, test)
        out = os.path.join(args.out, "minilm_contrastive")
        secs = run("contrastive", minilm, train_file, out, steps=10 if q else 80, batch=32, lr=3e-5, max_length=128)
        results["MiniLM + contrastive"] = {**score("MiniLM + contrastive", out, test), "train_s": round(secs)}
        comparisons.append(paired("MiniLM as shipped", "MiniLM + contrastive"))

    # 2. a small random-init BERT with a WordPiece vocabulary trained on the pre-training text: contrastive
    #    alone vs RetroMAE pre-training first, at several fine-tuning budgets (a random model overfits 1,203
    #    pairs within a few epochs: no one budget is fair to both arms)
    pairs_to_compare = []
    if args.part in ("all", "random"):
        pre_file = write_jsonl(os.path.join(args.out, "pretrain.jsonl"),
                               [{"text": t} for t in demo_pretrain_passages(train_rows, {p["module"] for p in test})])
        init = random_bert(os.path.join(args.out, "random_init"), pre_file, hidden=128, layers=2)
        pre = os.path.join(args.out, "random_retromae")
        secs_pre = run("retromae", init, pre_file, pre, steps=100 if q else 1500, batch=64, lr=5e-4, max_length=128)
        results["random BERT, no training"] = score("random BERT, no training", init, test)
        results["random BERT + RetroMAE, no fine-tuning"] = {
            **score("random BERT + RetroMAE, no fine-tuning", pre, test), "train_s": round(secs_pre)}
        alone_lrs = (3e-4,) if q else (3e-4, 1e-4, 1e-3)   # contrastive alone at other LRs too: is 3e-4 unfair?
        for steps in ([40] if q else [40, 120, 300]):
            for lr in alone_lrs:
                alone = f"random BERT + contrastive {steps}" + ("" if lr == 3e-4 else f" (lr {lr:g})")
                out = os.path.join(args.out, f"random_contrastive_{steps}" + ("" if lr == 3e-4 else f"_lr{lr:g}"))
                secs = run("contrastive", init, train_file, out, steps=steps, batch=32, lr=lr, max_length=128)
                results[alone] = {**score(alone, out, test), "train_s": round(secs)}
            with_pre = f"random BERT + RetroMAE + contrastive {steps}"
            out = os.path.join(args.out, f"random_retromae_contrastive_{steps}")
            secs = run("contrastive", pre, train_file, out, steps=steps, batch=32, lr=3e-4, max_length=128)
            results[with_pre] = {**score(with_pre, out, test), "train_s": round(secs + secs_pre)}
            pairs_to_compare.append((f"random BERT + contrastive {steps}", with_pre))
        best_alone = max((n for n in results if n.startswith("random BERT + contrastive")),
                         key=lambda n: results[n]["mrr@10"])
        worst_pre = min((n for n in results if n.startswith("random BERT + RetroMAE + contrastive")),
                        key=lambda n: results[n]["mrr@10"])
        if (best_alone, worst_pre) not in pairs_to_compare:   # the best contrastive-alone run vs the worst RetroMAE one
            pairs_to_compare.append((best_alone, worst_pre))

    print(f"\n{'model (contrastive N: N fine-tuning steps)':50s} {'MRR@10':>7s} {'R@1':>6s} {'R@10':>6s} {'nDCG@10':>8s} {'train s':>8s}")
    for name, m in results.items():
        print(f"{name:50s} {m['mrr@10']:7.4f} {m['recall@1']:6.4f} {m['recall@10']:6.4f} {m['ndcg@10']:8.4f} "
              f"{m.get('train_s', ''):>8}")
    comparisons += [paired(a, b) for a, b in pairs_to_compare]
    print("\n" + "\n".join(comparisons))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": results, "comparisons": comparisons}, f, indent=2)


if __name__ == "__main__":
    main()
