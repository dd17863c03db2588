"""`retro-pipeline serve`: the web app over a small built workdir (Flask's test client), checked against the raw
corpus, the raw neighbor files and a brute-force search; 50 concurrent searches against a real waitress server;
the command's one-line errors and a real start and stop."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import STAGES, assert_clean_error, free_port, invoke, saved_neighbors, write_corpus
from retro_pipeline.config import RunOptions
from retro_pipeline.pipeline import run_stages
from retro_pipeline.tokenizers import load_gpt_tokenizer

SEQ, CL, K = 64, 16, 4


def small_build(wd, corpus_prefix, gpt_path, model) -> None:
    """Every stage of a small build (chunks of 16 tokens, samples of 64, a Flat index, 4 neighbors saved)."""
    given = {"data_path": ["1", corpus_prefix], "gpt_tokenizer": gpt_path, "embedder": model, "chunk_length": CL,
             "seq_length": SEQ, "split": "90,10,0", "index_str": "Flat", "batch_size": 32, "device": "cpu",
             "num_neighbors_query": 40, "num_neighbors_save": K, "num_queries": 10, "global_batch_size": 2,
             "eval_iters": 1, "eval_interval": 1000}
    run_stages(str(wd), STAGES, given, RunOptions(executor="local", progress=False))


def unique_chunk(db, texts, min_chars: int = 40) -> int:
    """A train-DB row whose text is long and occurs once in the DB (so a search for it has one best answer)."""
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    return next(i for i in range(len(db) // 3, len(db)) if counts[texts[i]] == 1 and len(texts[i].strip()) >= min_chars)


@pytest.fixture(scope="module")
def built(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir, corpus_texts):
    from retro_pipeline.read import WorkdirReader
    from retro_pipeline.web import create_app
    from retro_pipeline.workdir import Workdir

    tmp = tmp_path_factory.mktemp("serve")
    gpt = load_gpt_tokenizer(gpt_tokenizer_path)
    texts = [t[:1500] for t in corpus_texts[:40]]   # 40 documents of real text, up to ~400 tokens each
    prefix = write_corpus(tmp / "c", gpt, texts)
    wd = tmp / "w"
    small_build(wd, prefix, gpt_tokenizer_path, tiny_bert_dir)
    reader = WorkdirReader(Workdir(wd))
    db = reader.db_chunks("train").astype(np.int64)
    app = create_app(wd)
    return {"wd": wd, "gpt": gpt, "db": db, "texts": reader.chunk_texts(db), "reader": reader, "app": app,
            "client": app.test_client(), "model": tiny_bert_dir, "prefix": prefix, "gpt_path": gpt_tokenizer_path}


def corpus_text(b, row) -> str:
    """A DB row's text straight from the corpus file: its document's tokens a:b, decoded."""
    from retro_pipeline.corpus import IndexedDataset

    ds = IndexedDataset(b["prefix"])
    ds_idx, doc, a, e = (int(x) for x in row[:4])
    return b["gpt"].decode(np.asarray(ds.get(doc, a, e - a), np.int64).tolist())


def brute_force(b, query: str, k: int) -> list[int]:
    """The k nearest train-DB rows by squared L2 between the tiny BERT's embedding of ``query`` (embedder's own
    Encoder, loaded here) and every vector of the Flat index, ties by id."""
    import faiss

    from embedder import Encoder

    index = faiss.read_index(str(next(b["wd"].rglob("added_1.000_1.000.faissindex"))))
    vectors = index.reconstruct_n(0, index.ntotal)
    q = Encoder.load(b["model"], device="cpu").encode([query])[0]
    d = ((vectors - q) ** 2).sum(1)
    return np.lexsort((np.arange(len(d)), d))[:k].tolist()


# ---------------------------------------------------------------------------------------------- search


def test_search_finds_the_chunk_a_phrase_comes_from_and_equals_brute_force(built):
    b = built
    c = unique_chunk(b["db"], b["texts"])
    r = b["client"].get("/api/search", query_string={"q": b["texts"][c], "k": 5})
    assert r.status_code == 200, r.data
    results = r.get_json()["results"]
    assert results[0]["chunk_id"] == c and results[0]["score"] < 1e-4
    assert results[0]["text"] == corpus_text(b, b["db"][c])
    assert results[0]["url"] == f"/chunk/{c}"
    for q in (b["texts"][c], "the function returns a list", "class method"):
        got = [x["chunk_id"] for x in b["client"].get("/api/search", query_string={"q": q, "k": 8}).get_json()["results"]]
        assert got == brute_force(b, q, 8), q
    # the HTML page lists the same chunks in the same order, texts escaped
    page = b["client"].get("/", query_string={"q": b["texts"][c], "k": 5})
    assert page.status_code == 200
    assert re.findall(r'class="chunk-link" href="/chunk/(\d+)"', page.text) == [str(x["chunk_id"]) for x in results]


def test_search_escapes_and_refuses_bad_queries(built):
    c = built["client"]
    page = c.get("/", query_string={"q": "<script>alert(1)</script>"})
    assert page.status_code == 200 and "<script>alert(1)" not in page.text and "&lt;script&gt;" in page.text
    for args, word in [({"q": ""}, "give a query"), ({"q": "x", "k": "0"}, "k="), ({"q": "x", "k": "abc"}, "k="),
                       ({"q": "x", "k": "101"}, "1 to 100"), ({"q": "x" * 3000}, "at most")]:
        r = c.get("/api/search", query_string=args)
        assert r.status_code == 400 and word in r.get_json()["error"], (args, r.data)
    r = c.get("/", query_string={"q": "x", "k": "abc"})
    assert r.status_code == 400 and "give a number of results" in r.text


# ---------------------------------------------------------------------------------------------- chunks


def test_chunk_page_shows_text_continuation_and_document_neighbours(built):
    b = built
    db = b["db"]
    same_doc = (db[1:, :2] == db[:-1, :2]).all(1)
    i = int(np.flatnonzero(same_doc[1:] & same_doc[:-1])[0]) + 1   # a chunk with chunks of its document both sides
    d = b["client"].get(f"/api/chunk/{i}").get_json()
    assert (d["dataset"], d["doc"], d["token_start"], d["token_end"]) == tuple(int(x) for x in db[i, :4])
    assert d["text"] == corpus_text(b, db[i]) and d["continuation"] == corpus_text(b, db[i + 1])
    assert (d["prev"], d["next"]) == (i - 1, i + 1)
    last = int(np.flatnonzero(~same_doc)[0])   # the last chunk of the first document
    d = b["client"].get(f"/api/chunk/{last}").get_json()
    assert d["next"] is None and d["continuation"] is None
    page = b["client"].get(f"/chunk/{i}")
    assert page.status_code == 200 and f'href="/chunk/{i - 1}"' in page.text and f'href="/chunk/{i + 1}"' in page.text


def test_chunk_lists_the_pretraining_chunks_holding_its_tokens_with_their_saved_neighbors(built):
    from retro_pipeline.corpus import IndexedDataset

    b = built
    ds = IndexedDataset(b["prefix"])
    checked = 0
    for i in range(0, len(b["db"]), 7):
        occ = b["client"].get(f"/api/chunk/{i}").get_json()["occurrences"]
        _, doc, a, e = (int(x) for x in b["db"][i, :4])
        mine = np.asarray(ds.get(doc, a, e - a), np.int64)
        for o in occ:
            ss = b["reader"].samples(o["split"])
            chunk = ss.tokens(o["sample"], o["sample"] + 1)[0, o["chunk"] * CL:(o["chunk"] + 1) * CL]
            n = o["shared"]
            # the shared tokens: the end of the DB chunk starts the pretraining chunk, or the other way round
            assert 0 < n <= CL and ((chunk[:n] == mine[len(mine) - n:]).all() or (chunk[CL - n:] == mine[:n]).all()
                                    or n == len(mine) and any((chunk[s:s + n] == mine).all() for s in range(CL - n + 1)))
            nb = saved_neighbors(b["wd"], o["split"])[o["sample"] * (SEQ // CL) + o["chunk"]]
            assert [x["chunk_id"] for x in o["neighbors"]] == nb[:len(o["neighbors"])].tolist()
            checked += 1
    assert checked > 20


# ---------------------------------------------------------------------------------------------- samples


def test_sample_page_shows_each_chunk_beside_its_saved_neighbors_and_own_document_drops(built):
    from retro_pipeline.dataset import RetroSamples

    b = built
    saved = saved_neighbors(b["wd"], "train")
    ss = b["reader"].samples("train")
    L = SEQ // CL
    browser = b["app"].config["browser"]
    n_dropped = 0
    for i in range(min(ss.n_samples, 6)):
        s = browser.sample("train", i, 0)
        own = {tuple(x) for x in ss.doc_ids(i).tolist()}
        item = RetroSamples(b["wd"], "train")[i]
        for j, ch in enumerate(s["chunks"]):
            assert [n["chunk_id"] for n in ch["neighbors"]] == saved[i * L + j].tolist()
            for n in ch["neighbors"]:
                if n["chunk_id"] >= 0:
                    assert (n["dataset"], n["doc"]) not in own and n["text"] == corpus_text(b, b["db"][n["chunk_id"]])
            for d in ch["dropped"]:   # dropped for being from one of the sample's documents, ranked among the saved
                assert (d["dataset"], d["doc"]) in own and d["chunk_id"] not in saved[i * L + j]
            n_dropped += len(ch["dropped"])
        assert ch["text"] == b["gpt"].decode(item["text"][(L - 1) * CL:L * CL].tolist())
    assert n_dropped > 0   # the build drops some (a chunk's own text is its nearest hit)
    page = b["client"].get("/sample/train/0")
    assert page.status_code == 200 and page.text.count('class="card grid sample-chunk"') == L
    assert "dropped (own document)" in b["client"].get("/sample/train/0?n=0").text


# ---------------------------------------------------------------------------------------------- errors and status


@pytest.mark.parametrize("url, words", [
    ("/chunk/999999", ["chunk 999999 does not exist", "ids 0.."]),
    ("/sample/train/999999", ["train sample 999999 does not exist"]),
    ("/sample/test/0", ["the test split has no samples"]),
    ("/sample/bogus/0", ["no page at /sample/bogus/0"]),
    ("/chunk/-1", ["no page at"]),
    ("/chunk/..%2f..%2fconfig.json", ["no page at"]),
    ("/static/../config.json", ["no page at"]),
])
def test_bad_ids_are_a_404_page_saying_what_exists(built, url, words):
    r = built["client"].get(url)
    assert r.status_code == 404 and 'id="error-message"' in r.text, r.text
    for w in words:
        assert w in r.text, (w, r.text)
    api = built["client"].get("/api" + url) if url.startswith("/chunk/") else None
    if api is not None:
        assert api.status_code == 404 and words[0] in api.get_json()["error"]


def test_read_only_and_status_page_says_what_status_says(built):
    c = built["client"]
    assert c.post("/api/search", data={"q": "x"}).status_code == 405
    assert c.delete("/chunk/0").status_code == 405
    page = c.get("/status").text
    out = invoke("status", "--workdir", built["wd"]).output
    for line in out.splitlines():
        name, state = line.split()[:2]
        assert re.search(rf"<td>{name}</td><td class=\"state-{state}\">{state}</td>", page), (name, page)


# ---------------------------------------------------------------------------------------------- a real server


def test_50_concurrent_searches_equal_sequential_ones(built):
    from retro_pipeline.cli_serve import make_server

    b = built
    queries = [b["texts"][i] for i in range(0, len(b["texts"]), max(1, len(b["texts"]) // 10))][:10]
    queries += ["the function returns a list", "class method", "import the module", "a string", "raise an error"]
    server = make_server(b["app"], "127.0.0.1", free_port(), threads=8)
    port = server.effective_port
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def get(q):
        url = f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": q, "k": 10})
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())

    try:
        sequential = {q: get(q) for q in queries}
        asked = [queries[n % len(queries)] for n in range(50)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            got = list(pool.map(get, asked))
        assert time.monotonic() - t0 < 120
    finally:
        server.close()
        thread.join(10)
    for q, (status, body) in zip(asked, got):
        assert status == 200 and body == sequential[q][1], q
    assert len({json.dumps(sequential[q][1]["results"][:1]) for q in queries}) > 5   # not all one answer


# ---------------------------------------------------------------------------------------------- the command


def test_serve_refuses_with_one_line(built, tmp_path):
    wd = built["wd"]
    assert_clean_error(invoke("serve", "--workdir", tmp_path / "none"), "no such workdir")
    assert_clean_error(invoke("serve", "--workdir", tmp_path), "not a retro-pipeline workdir")
    partial = tmp_path / "partial"
    run_stages(str(partial), ["db-build"], {"data_path": ["1", built["prefix"]], "gpt_tokenizer": built["gpt_path"],
                                            "embedder": built["model"], "chunk_length": CL},
               RunOptions(executor="local", progress=False))
    assert_clean_error(invoke("serve", "--workdir", partial), "index-add has not finished", "retro-pipeline build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clean_error(invoke("serve", "--workdir", wd, "--port", port), f"--port {port}", "already listens")
    assert_clean_error(invoke("serve", "--workdir", wd, "--host", "no-such-host.invalid"), "--host",
                       ignore=("warning:",))
    assert_clean_error(invoke("serve", "--workdir", wd, "--port", "70000"), "--port")


def test_serve_command_starts_answers_and_stops(built):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "retro_pipeline.cli", "serve", "--workdir", str(built["wd"]),
                          "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 120, None
        while body is None and time.monotonic() < deadline and p.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/search?q=class+method&k=3", timeout=30) as r:
                    body = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert body is not None and len(body["results"]) == 3, p.poll()
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=30)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert f"serving {built['wd']} on http://127.0.0.1:{port}/" in err and "stopped" in err and "Traceback" not in err
