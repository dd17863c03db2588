"""Embedding throughput: ``embedder.Encoder.encode`` (the pipeline's path) against a plain transformers loop.

Both paths run the same model, tokenizer, pooling, device and dtype on the same texts: pieces of Python's own
documentation (``pydoc_data.topics``), about the size of RETRO chunks (64 GPT-2 tokens, ~250 characters). The
plain loop takes ``--batch-size`` texts a batch; the Encoder takes at most that many and batches by its own
rule (one padded width a batch, its default token budget: 1024 padded tokens on CPU, 32768 on CUDA).
Two sets are timed:

- mixed: pieces of 20..400 characters (seeded RNG), where sorting by length cuts padding;
- uniform: pieces of exactly 62 + 2 tokens in the model's tokenizer, where sorting cannot help (this measures
  the Encoder's own overhead: ratio >= 0.9 wanted).

The plain loop tokenizes consecutive batches in input order with ``padding=True``, runs the model under
``torch.inference_mode()`` (and the same autocast), pools the same way and copies each batch to the host.
Reported: median chunks/s of each path over ``--repeats`` timed rounds (after one warm-up round; the paths take
turns within a round, so background load hits both alike), their ratio (Encoder / plain) and the max abs
difference between the two outputs. On CUDA it also times the Encoder in float16 and bfloat16 and
reports model FLOPs utilisation: useful FLOPs (unpadded tokens; 2 x non-embedding parameters per token plus
4 x layers x hidden x sequence length for attention scores and values) over time, against ``--peak-tflops``.

    python benchmarks/bench_embed.py                          # packaged all-MiniLM-L6-v2, CUDA if present
    python benchmarks/bench_embed.py --device cpu --n 512 --repeats 3
    python benchmarks/bench_embed.py --model DIR_OR_HUB_ID --batch-size 256 --n 20000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from embedder import Encoder


def _docs_text() -> str:
    from pydoc_data.topics import topics

    return " ".join(" ".join(topics[k].split()) for k in sorted(topics))


def mixed_texts(n: int, lo: int = 20, hi: int = 400, seed: int = 0) -> list[str]:
    """n consecutive pieces of the Python docs of lo..hi characters each (seeded)."""
    text = _docs_text()
    sizes = np.random.default_rng(seed).integers(lo, hi + 1, size=n)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) % (len(text) - hi)
    return [text[s:s + k] for s, k in zip(starts.tolist(), sizes.tolist())]


def uniform_texts(tokenizer, n: int, tokens: int = 62) -> list[str]:
    """n pieces of the Python docs that are each exactly ``tokens`` tokens long in ``tokenizer`` (plus the
    special tokens): pieces start and end on word boundaries, where a cut leaves the tokens unchanged."""
    text = _docs_text()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    words, offsets = enc.word_ids(), enc["offset_mapping"]
    is_start = [i == 0 or words[i] != words[i - 1] for i in range(len(words))] + [True]
    pieces, s = [], 0
    while s + tokens < len(words):
        if is_start[s] and is_start[s + tokens]:
            pieces.append(text[offsets[s][0]:offsets[s + tokens - 1][1]])
            s += tokens
        else:
            s += 1
    if not pieces:
        raise SystemExit(f"the Python docs hold no piece of exactly {tokens} tokens; pick another length")
    return [pieces[i % len(pieces)] for i in range(n)]  # repeats beyond ~2000 pieces


def plain_loop(enc: Encoder, texts: list[str], batch_size: int, dtype: torch.dtype) -> np.ndarray:
    """The baseline: consecutive batches, padding=True, the same pooling written out directly."""
    model, tok, device = enc.model, enc.tokenizer, enc.device
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(0, len(texts), batch_size):
            batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=enc.max_length,
                        return_tensors="pt", return_special_tokens_mask=True).to(device)
            special = batch.pop("special_tokens_mask")
            hidden = model(**batch).last_hidden_state.float()
            if enc.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"] * (1 - special) if enc.pooling == "mean-no-special" \
                    else batch["attention_mask"]
                mask = mask.unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            if enc.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.cpu())
    return torch.cat(out).numpy()


def timed(fns: list, repeats: int, cuda: bool) -> tuple[list[float], list[np.ndarray]]:
    """Median seconds of each function over ``repeats`` rounds after one warm-up round, and its last result.

    The functions take turns within each round, so a busy machine slows all of them alike.
    """
    results = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            results[k] = fn()
            if cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], results


def model_flops(enc: Encoder, texts: list[str]) -> float:
    """Forward FLOPs of the unpadded token sequences (matmuls only)."""
    cfg = enc.model.config
    n_params = sum(p.numel() for p in enc.model.parameters())
    n_embed = sum(p.numel() for p in enc.model.get_input_embeddings().parameters())
    n_embed += sum(p.numel() for name, p in enc.model.named_parameters() if "position_embeddings" in name
                   or "token_type_embeddings" in name)
    lengths = np.array([len(x) for x in enc.tokenize(texts)], dtype=np.float64)
    per_token = 2.0 * (n_params - n_embed)
    attention = 4.0 * cfg.num_hidden_layers * cfg.hidden_size * lengths  # QK^T and AV, per token
    return float((lengths * (per_token + attention)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="chunks per set")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default=None, help="directory or hub id (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32/float16/bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uniform-tokens", type=int, default=62, help="text tokens per chunk of the uniform set")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 dense bf16: 989)")
    args = ap.parse_args()

    enc = Encoder.load(args.model, device=args.device, dtype=args.dtype, num_threads=args.threads)
    cuda = enc.device.type == "cuda"
    name = torch.cuda.get_device_name(enc.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model or 'all-MiniLM-L6-v2 (packaged)'}: pooling={enc.pooling} normalize={enc.normalize} "
          f"max_length={enc.max_length} dim={enc.dim}; device {name}; dtype {enc.compute_dtype}; "
          f"batch {args.batch_size}; n {args.n}; median of {args.repeats}")
    sets = {"mixed 20..400 chars": mixed_texts(args.n),
            f"uniform {args.uniform_tokens + 2} tokens": uniform_texts(enc.tokenizer, args.n, args.uniform_tokens)}
    for label, texts in sets.items():
        lengths = np.array([len(x) for x in enc.tokenize(texts)])
        (t_enc, t_plain), (a, b) = timed([lambda: enc.encode(texts, batch_size=args.batch_size),
                                          lambda: plain_loop(enc, texts, args.batch_size, enc.compute_dtype)],
                                         args.repeats, cuda)
        print(f"{label:>20}: tokens/chunk {lengths.mean():.1f} (min {lengths.min()}, max {lengths.max()}) | "
              f"Encoder.encode {args.n / t_enc:9.1f} chunks/s | plain loop {args.n / t_plain:9.1f} chunks/s | "
              f"ratio {t_plain / t_enc:.2f} | max |diff| {np.abs(a - b).max():.2e}")
        if cuda:
            flops = model_flops(enc, texts)
            keep = enc.compute_dtype
            for dt in (torch.float16, torch.bfloat16):
                enc.compute_dtype = dt
                (t,), _ = timed([lambda: enc.encode(texts, batch_size=args.batch_size)], args.repeats, cuda)
                print(f"{'':>20}  {str(dt):>15}: {args.n / t:9.1f} chunks/s, "
                      f"MFU {flops / t / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops:g} TFLOPS")
            enc.compute_dtype = keep


if __name__ == "__main__":
    main()
