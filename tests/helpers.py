"""Helpers the test modules share: plain functions and constants (the fixtures are in conftest.py).

Test modules import them as ``from helpers import ...`` (tests/ is on sys.path, as it is for conftest.py);
conftest.py registers this module for pytest's assertion rewriting, so its asserts explain themselves."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

# the five stages of a full build, in order
STAGES = ["db-build", "embed-sampled", "index-train", "index-add", "query-neighbors"]


# ---------------------------------------------------------------------- processes


def script(name: str) -> str:
    """A console script of the environment running the tests (its bin/ need not be on PATH)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_ray_address(env=None) -> dict[str, str]:
    """``env`` (default: os.environ) without RAY_ADDRESS: a subprocess's Ray is its own, not a cluster the
    environment of the tests happens to name."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != "RAY_ADDRESS"}


# ---------------------------------------------------------------------- the CLI


def invoke(*args):
    """The CLI in-process (click's CliRunner); arguments may be paths or numbers."""
    from click.testing import CliRunner

    from retro_pipeline.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def invoke_ok(*args):
    """:func:`invoke` of a command that must succeed (exit code 0)."""
    r = invoke(*args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def db_build_args(wd, prefix, gpt, bert, *extra, local: bool = True) -> list[str]:
    """A small db-build's command line (after ``retro-pipeline``): chunks of 16 tokens, blocks of 4 documents, no
    progress bars, the local executor unless ``local`` is false; ``extra`` comes last (it may override)."""
    args = ["db-build", "--workdir", wd, "--data-path", prefix, "--gpt-tokenizer", gpt, "--embedder", bert,
            "--chunk-length", 16, "--block-size", 4, "--no-progress", *(["--executor", "local"] if local else []),
            *extra]
    return [str(a) for a in args]


def one_line_error(stderr: str, *words, ignore: tuple[str, ...] = ()) -> str:
    """A failed command's stderr is one ``error: ...`` line (blank lines, and lines starting with one of
    ``ignore``, aside) holding each of ``words``, and no traceback; returns that line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(ignore)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def assert_clean_error(result, *words, ignore: tuple[str, ...] = ()) -> str:
    """A CliRunner result of a refused command: exit code 2, no traceback anywhere in its output, and the
    :func:`one_line_error` on stderr; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    return one_line_error(result.stderr, *words, ignore=ignore)


# ---------------------------------------------------------------------- corpora


def write_corpus(prefix, gpt, texts: list[str]) -> str:
    """``texts`` as an indexed dataset at ``prefix``: one document each, GPT tokens, EOD-terminated."""
    from retro_pipeline.corpus import write_indexed_dataset

    write_indexed_dataset(str(prefix), [np.append(t, gpt.eod_id) for t in gpt.encode_batch(texts)], np.uint16)
    return str(prefix)


def edge_case_docs(gpt, texts: list[str], chunk_length: int, n_docs: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Documents (token arrays, EOD-terminated unless noted) covering every chunking case."""
    rng = np.random.default_rng(seed)
    eod = gpt.eod_id
    enc = gpt.encode_batch(texts)
    pool = np.concatenate(enc)
    blank = gpt.encode_batch([" \n \n   \n" * 200])[0]  # text that is empty in a BERT vocabulary
    docs = [
        np.array([eod]),                                  # empty document
        np.array([], dtype=np.int64),                     # zero tokens, not even EOD
        np.append(pool[:1], eod),                         # one token
        np.append(pool[: chunk_length - 1], eod),         # shorter than a chunk
        np.append(pool[: chunk_length], eod),             # exactly one chunk
        np.append(pool[: 3 * chunk_length], eod),         # exact multiple
        pool[100: 100 + 2 * chunk_length + 5],            # no trailing EOD
        np.append(blank[: 3 * chunk_length], eod),        # only whitespace: every chunk invalid
        np.concatenate([pool[:chunk_length], blank[:chunk_length], pool[:10], [eod]]),  # invalid in the middle
    ]
    while len(docs) < n_docs:
        t = enc[int(rng.integers(len(enc)))]
        n = int(rng.integers(1, min(len(t), 6 * chunk_length) + 1))
        docs.append(np.append(t[:n], eod))
    order = rng.permutation(len(docs))
    return [np.asarray(docs[i], dtype=np.int64) for i in order]


def random_size_corpus(prefix, gpt, texts, seed: int, sizes, max_docs: int) -> str:
    """Real text cut into up to ``max_docs`` EOD-terminated documents of seeded random ``sizes`` (GPT tokens),
    written as the indexed dataset ``prefix``."""
    from retro_pipeline.corpus import write_indexed_dataset

    rng = np.random.default_rng(seed)
    stream = np.concatenate(gpt.encode_batch(texts))
    docs, pos = [], 0
    while pos < len(stream) and len(docs) < max_docs:
        n = int(rng.choice(sizes))
        docs.append(np.append(stream[pos:pos + n], gpt.eod_id))
        pos += n
    write_indexed_dataset(str(prefix), docs, np.uint16)
    return str(prefix)


def reference_block(gpt_tok, bert_tok, docs, doc_range, chunk_length, eod):
    """Megatron's per-chunk loop, written plainly: detokenize, retokenize, classify."""
    valid, invalid, offsets, total = [], [], [], 0
    for doc_id in range(*doc_range):
        doc = [int(x) for x in docs[doc_id]]
        if doc and doc[-1] == eod:
            doc = doc[:-1]
        for s in range(0, len(doc), chunk_length):
            e = min(len(doc), s + chunk_length)
            text = gpt_tok.decode(doc[s:e], skip_special_tokens=True)
            n = len(bert_tok.encode(text, add_special_tokens=False).ids)
            (valid if n else invalid).append((doc_id, s, e, n))
            total += bool(n)
        offsets.append((doc_id, total))
    as_arr = lambda rows, w: np.array(rows, dtype=np.uint64 if w == 2 else np.uint32).reshape(-1, w)  # noqa: E731
    return as_arr(valid, 4), as_arr(invalid, 4), as_arr(offsets, 2)


def read_h5(path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}


# ---------------------------------------------------------------------- a small five-stage build

# options of a small build of all five stages (with BUILD_OPTIONS' corpus: every stage has several blocks)
BUILD_OPTIONS = {"chunk_length": 16, "seq_length": 64, "split": "80,10,10", "index_str": "IVF4,Flat",
                 "block_size": 256, "num_queries": 40, "num_neighbors_save": 4, "num_neighbors_query": 40,
                 "batch_size": 64, "device": "cpu",
                 "embed_pool": 1}  # blocks embedded alone, so that kills land between blocks (pools: test_embed_stage)


def build_corpus(path, gpt, texts) -> str:
    """The corpus of the BUILD_OPTIONS build: 500 documents of 5 to 150 tokens."""
    return random_size_corpus(path, gpt, texts, 7, [5, 20, 40, 90, 150], 500)


def build_cli_args(wd, prefix, gpt, bert, workers) -> list[str]:
    """`python -m retro_pipeline.cli build` with BUILD_OPTIONS: local with 0 workers, else that many on Ray."""
    args = [sys.executable, "-m", "retro_pipeline.cli", "build", "--workdir", str(wd), "--data-path", prefix,
            "--gpt-tokenizer", gpt, "--embedder", bert, "--no-progress"]
    for k, v in BUILD_OPTIONS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + (["--executor", "local"] if workers == 0 else ["--num-workers", str(workers)])


def outputs(wd) -> dict[str, bytes]:
    """Every output file: DBs, embeddings, index files, neighbors (markers, logs, timings and the build report
    aside)."""
    out = {}
    for p in sorted(wd.rglob("*")):
        rel = str(p.relative_to(wd))
        if not p.is_file() or rel.startswith(("markers", "logs")) or rel == "report.html" or \
                p.name in ("config.json", "search.json"):
            continue
        out[rel] = p.read_bytes()
    search = sorted(wd.rglob("search.json"))
    for p in search:  # the tuned setting and recalls must agree; queries/s are timings
        s = json.loads(p.read_text())
        out[str(p.relative_to(wd))] = json.dumps(
            {"params": s["params"], "recall": [{k: v for k, v in r.items() if "second" not in k}
                                                for r in s["table"]]}, sort_keys=True).encode()
    return out


def saved_neighbors(wd, split) -> np.ndarray:
    """The neighbor ids query-neighbors saved for ``split`` in workdir ``wd``, all its files in order."""
    import h5py

    d = wd / "query" / json.loads((wd / "config.json").read_text())["retro_neighbor_dirs"][split]
    files = sorted(d.glob("*.hdf5"), key=lambda p: int(p.name.split("-")[0]))
    return np.concatenate([h5py.File(p, "r")["neighbors"][...] for p in files])


def blocks_done(wd, stage) -> int:
    """How many of ``stage``'s blocks have their marker in workdir ``wd``."""
    d = wd / "markers" / stage
    return len([p for p in d.glob("*.json") if not p.name.startswith("_")]) if d.exists() else 0
