"""`retro-pipeline report` and the build timeline: the report of a partial, a resumed and a full build shows what
exists (the rest says not run yet), its numbers equal `status`'s, `search.json`'s and the DB's, every plot is an
inline SVG with drawing in it, the timeline keeps both runs of a resumed build with every block finished once,
a line cut short by a kill does not break it, and a bad workdir is a one-line error."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers import STAGES, assert_clean_error, build_corpus, invoke
from retro_pipeline import pipeline
from retro_pipeline.config import RunOptions
from retro_pipeline.executor.base import LocalExecutor, read_timeline, timeline_path
from retro_pipeline.io import read_json
from retro_pipeline.pipeline import run_stages, status
from retro_pipeline.report import render_report
from retro_pipeline.tokenizers import load_gpt_tokenizer

OPTIONS = {"chunk_length": 16, "seq_length": 64, "split": "80,10,10", "index_str": "IVF4,Flat", "block_size": 256,
           "num_queries": 40, "num_neighbors_save": 4, "num_neighbors_query": 40, "batch_size": 64, "device": "cpu",
           "embed_pool": 1, "global_batch_size": 4, "eval_iters": 2}
STOP_AFTER = 19   # db-build's 16 blocks and 3 of embed-sampled's 8


def report_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "no machine-readable block in the page"
    return json.loads(m.group(1).replace("<\\/", "</"))


def cells(page: str, key: str) -> list[str]:
    """The visible text of every table cell (or bold number) the page marks with ``data-k=key``."""
    import html

    return [html.unescape(x) for x in re.findall(rf'<(?:td|b) data-k="{re.escape(key)}">(.*?)</(?:td|b)>', page)]


def stage_rows(page: str) -> dict[str, dict[str, str]]:
    """The stage table as it shows: stage -> column -> cell text."""
    out = {}
    for row in re.findall(r"<tr>(<td data-k=\"stage\">.*?)</tr>", page):
        d = dict(re.findall(r'<td data-k="([^"]+)">(.*?)</td>', row))
        out[d["stage"]] = d
    return out


def assert_plots(page: str, data: dict, expected: set[str]) -> None:
    """Each plot named is in the page as an inline SVG that draws something (path elements)."""
    assert expected <= set(data["plots"]), (expected, data["plots"])
    for name in data["plots"]:
        m = re.search(rf'<figure class="plot" id="plot-{name}">(.*?)</figure>', page, re.S)
        assert m, name
        svg = m.group(1)
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>"), name
        assert svg.count("<path") >= 5, (name, svg.count("<path"))
    # nothing to fetch (scripts, styles, images, fonts): it opens offline
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//|@import|url\((?!#)', page)
    assert "<metadata>" not in page


class StopAfter(LocalExecutor):
    """The local executor, interrupted (as by Ctrl-C) after ``n`` finished blocks over every stage."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def run(self, stage, groups, on_result):
        def counted(block, result):
            on_result(block, result)
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt

        super().run(stage, groups, counted)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir, corpus_texts):
    """A build stopped in embed-sampled (its report then), a line of the timeline cut short as a kill mid-write
    leaves it, and the build finished by `retro-pipeline build`, which ends by writing W/report.html."""
    tmp = tmp_path_factory.mktemp("report")
    prefix = build_corpus(tmp / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts[:40])
    wd = tmp / "w"
    given = {"data_path": ["1", prefix], "gpt_tokenizer": gpt_tokenizer_path, "embedder": tiny_bert_dir, **OPTIONS}
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "make_executor", lambda run: StopAfter(STOP_AFTER))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stages(str(wd), STAGES, given, RunOptions(executor="local", progress=False))
    finally:
        mp.undo()
    partial = {"page": render_report(wd), "status": status(wd)}
    with open(timeline_path(wd), "ab") as f:
        f.write(b'{"event": "block", "stage": "embed-sampled", "blo')  # cut short by a kill
    args = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    r = invoke("build", "--workdir", wd, "--executor", "local", "--no-progress", *args)
    assert r.exit_code == 0, (r.output, r.exception)
    return {"wd": wd, "partial": partial, "build_output": r.output}


def test_a_partial_build_reports_what_exists_and_says_the_rest_has_not_run(resumed):
    page, st = resumed["partial"]["page"], resumed["partial"]["status"]
    data = report_data(page)
    assert st["db-build"]["state"] == "done" and st["embed-sampled"]["state"] == "partial"
    rows = stage_rows(page)
    for s in STAGES:
        assert data["stages"][STAGES.index(s)]["state"] == st[s]["state"] == rows[s]["state"]
    assert rows["embed-sampled"]["blocks"] == f"{st['embed-sampled']['blocks_done']} / " \
                                              f"{st['embed-sampled']['blocks_total']}" == "3 / 8"
    assert rows["db-build"]["seconds"] == f"{st['db-build']['seconds']:,.2f}"
    assert rows["index-train"]["state"] == "not started" and rows["index-train"]["seconds"] == "—"
    for section in ("chunks", "datasets", "stages", "timeline"):
        assert data["sections"][section] == "shown", (section, data["sections"][section])
    assert data["sections"]["search"] == "not run yet: index-add has not started"
    assert data["sections"]["neighbors"] == data["sections"]["examples"] == \
        "not run yet: query-neighbors has not started"
    assert "not run yet: index-add has not started" in page
    assert_plots(page, data, {"stage_times", "worker_timeline", "chunk_lengths", "datasets"})
    # the interrupted run: its embed-sampled blocks are on the timeline, its stage ended stopped
    assert data["timeline"]["blocks_finished"]["embed-sampled"] == {"events": 3, "distinct": 3}
    assert data["runs"][0]["ended"] == "embed-sampled: stopped: KeyboardInterrupt"


def test_a_resumed_build_shows_both_runs_and_every_block_finished_once(resumed):
    wd = resumed["wd"]
    events = read_timeline(timeline_path(wd))  # the line cut short is skipped; the next run's lines are whole
    runs = list(dict.fromkeys(e["run"] for e in events))
    assert len(runs) == 2
    raw = timeline_path(wd).read_bytes().split(b"\n")
    assert sum(1 for ln in raw if ln.strip()) == len(events) + 1  # only the cut line is not a record
    st = status(wd)
    for s in STAGES:
        blocks = [e["block"] for e in events if e["event"] == "block" and e["stage"] == s]
        assert sorted(blocks) == sorted(read_json(wd / "markers" / s / "_plan.json")["blocks"]), s
        assert len(set(blocks)) == len(blocks) == st[s]["blocks"], s
    first = {e["block"] for e in events if e["event"] == "block" and e["run"] == runs[0]}
    assert len(first) == STOP_AFTER
    ends = [(e["run"], e["stage"], e["state"]) for e in events if e["event"] == "stage_end"]
    assert ends[:2] == [(runs[0], "db-build", "done"), (runs[0], "embed-sampled", "stopped: KeyboardInterrupt")]
    assert [e[1:] for e in ends[2:]] == [(s, "done") for s in STAGES[1:]] and {e[0] for e in ends[2:]} == {runs[1]}
    for e in events:
        if e["event"] == "block":
            assert e["start"] <= e["end"] <= e["time"] and e["pid"] and e["host"] and e["rows"] > 0 and e["bytes"] > 0

    page = (wd / "report.html").read_text()  # `build` ended by writing it
    data = report_data(page)
    assert [r["run"] for r in data["runs"]] == runs and data["timeline"]["runs"] == runs
    assert data["runs"][1]["stages"] == STAGES[1:]
    assert [r["blocks"] for r in data["runs"]] == [STOP_AFTER, sum(e["event"] == "block" for e in events) - STOP_AFTER]
    assert {s: d["events"] for s, d in data["timeline"]["blocks_finished"].items()} == \
        {s: st[s]["blocks"] for s in STAGES}
    rows = stage_rows(page)
    assert rows["embed-sampled"]["runs"] == "2" and rows["index-add"]["runs"] == "1"
    assert runs[0] in page and runs[1] in page


def test_a_full_build_reports_the_numbers_of_status_search_json_and_the_db(resumed):
    import h5py

    wd = resumed["wd"]
    page = render_report(wd)
    data = report_data(page)
    st = status(wd)
    assert all(v == "shown" for v in data["sections"].values()), data["sections"]
    assert_plots(page, data, {"stage_times", "worker_timeline", "chunk_lengths", "datasets", "recall",
                              "missing_by_rank", "similarity"})
    rows = stage_rows(page)
    for rec in data["stages"]:
        s = rec["stage"]
        assert rec["state"] == "done" and rec["seconds"] == st[s]["seconds"], s
        assert rec["blocks_done"] == rec["blocks_total"] == st[s]["blocks"], s
        assert rows[s]["seconds"] == f"{st[s]['seconds']:,.2f}" and rows[s]["blocks"] == f"{st[s]['blocks']} / {st[s]['blocks']}"
    db, q = st["db-build"], st["query-neighbors"]
    assert data["stages"][0]["rows"] == db["n_chunks_train"] + db["n_chunks_valid"] + db["n_chunks_invalid"]
    n_query = sum(q[f"n_chunks_{s}"] for s in ("train", "valid", "test"))
    assert data["stages"][4]["rows"] == n_query
    assert data["stages"][4]["chunks_per_s"] == round(n_query / q["seconds"], 1)

    # search.json: the tuned point, the recall and the whole table, in the data and as shown
    search = read_json(next(wd.glob("index/faiss-par-add/*/search.json")))
    for k in ("params", "recall@10", "target_recall", "table", "index_str", "k", "n_queries"):
        assert data["search"][k] == search[k], k
    assert cells(page, "recall@10") == [str(search["recall@10"])] + [f"{r['recall@10']:.4f}" for r in search["table"]]
    assert cells(page, "nprobe") == [str(r["nprobe"]) for r in search["table"]]
    tuned = [r["nprobe"] == search["params"]["nprobe"] for r in search["table"]]
    assert [c == "tuned" for c in cells(page, "tuned")] == tuned and any(tuned)

    # neighbors: the counts query-neighbors recorded, and the missing share per rank of the neighbor files
    nb = data["neighbors"]
    assert nb["n_neighbors_missing"] == q["n_neighbors_missing"] and nb["n_dropped_own_sample"] == q["n_dropped_own_sample"]
    assert cells(page, "n_neighbors_missing") == [f"{q['n_neighbors_missing']:,}"]
    assert cells(page, "n_dropped_own_sample") == [f"{q['n_dropped_own_sample']:,}"]
    assert nb["missing_share"] == q["n_neighbors_missing"] / (n_query * OPTIONS["num_neighbors_save"])
    from helpers import saved_neighbors

    every = saved_neighbors(wd, "train")
    assert len(every) <= 20_000 and nb["rows_sampled_for_ranks"] == len(every)  # small: the sample is all of it
    assert nb["missing_by_rank_sampled"] == [round(float(x), 5) for x in (every < 0).mean(axis=0)]

    # the similarity sample: the page's examples are the saved neighbors of those chunks
    sim = data["similarity"]
    assert sim["n_query_chunks"] == 16 and sim["n_pairs"] == int((every[np.unique(np.linspace(
        0, len(every) - 1, 16).astype(int))][:, :5] >= 0).sum())
    assert -1.0 <= sim["all_ranks"]["min"] <= sim["all_ranks"]["max"] <= 1.0 + 1e-6
    for ex in data["examples"]:
        assert ex["neighbors"] == every[ex["chunk"]][:3].tolist()

    # corpora and chunk lengths: indexed_dataset_infos.json and the train DB
    infos = read_json(wd / "db" / "indexed_dataset_infos.json")
    for d, info in zip(data["datasets"], infos):
        for k in ("n_docs", "n_docs_train", "n_chunks", "n_chunks_train", "n_chunks_invalid", "n_chunks_sampled"):
            assert d[k] == info[k], k
    assert cells(page, "n_chunks_train") == [f"{info['n_chunks_train']:,}" for info in infos]
    assert [data["samples"][s] for s in ("train", "valid", "test")] == [q[f"n_samples_{s}"] for s in ("train", "valid", "test")]
    with h5py.File(wd / "db" / "merged" / "train.hdf5", "r") as f:
        chunks = f["chunks"][...]
    ch = data["chunks"]
    assert ch["rows_sampled"] == len(chunks) == db["n_chunks_train"]  # small: every row
    assert ch["gpt_tokens"]["mean"] == round(float((chunks[:, 3].astype(int) - chunks[:, 2]).mean()), 3)
    assert ch["embedder_tokens"]["max"] == float(chunks[:, 4].max())
    assert ch["n_chunks_invalid"] == db["n_chunks_invalid"]


def test_the_report_command_writes_the_page_and_prints_its_path(resumed, tmp_path):
    out = tmp_path / "r" / "page.html"
    (tmp_path / "r").mkdir()
    r = invoke("report", "--workdir", resumed["wd"], "--output", out, "--similarity-sample", 0)
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stdout.strip() == str(out)
    data = report_data(out.read_text())
    assert data["similarity"] == {"skipped": "--similarity-sample 0"} and data["sections"]["neighbors"] == "shown"
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["page.html"]  # written atomically: no temporary left


def test_a_bad_workdir_is_a_one_line_error(tmp_path):
    assert_clean_error(invoke("report", "--workdir", tmp_path / "nowhere"), "nowhere", "no such directory")
    (tmp_path / "empty").mkdir()
    assert_clean_error(invoke("report", "--workdir", tmp_path / "empty"), "not a retro-pipeline workdir")
    assert not (tmp_path / "empty" / "report.html").exists()


def test_the_timeline_skips_a_cut_line_and_the_next_run_starts_a_line_of_its_own(tmp_path):
    from retro_pipeline.executor.base import Timeline

    path = timeline_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(b'{"event": "run_start", "run": "a", "time": 1}\n{"event": "blo')
    t = Timeline(tmp_path, "b")
    t.append("run_start")
    t.append("block", stage="s", block="x")
    assert [(e["run"], e["event"]) for e in read_timeline(path)] == [("a", "run_start"), ("b", "run_start"),
                                                                      ("b", "block")]
    assert read_timeline(tmp_path / "none.jsonl") == []


@pytest.mark.slow  # a CLI build killed, then resumed on 2 Ray workers; chromium renders the page
def test_a_killed_build_resumed_on_ray_reports_both_runs_and_its_page_renders(tmp_path, gpt_tokenizer_path,
                                                                              tiny_bert_dir, corpus_texts):
    import os
    import shutil
    import signal
    import subprocess

    from helpers import build_cli_args, env_without_ray_address

    prefix = build_corpus(tmp_path / "corpus", load_gpt_tokenizer(gpt_tokenizer_path), corpus_texts[:40])
    wd = tmp_path / "w"
    env = env_without_ray_address()
    r = subprocess.run(build_cli_args(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, 0), capture_output=True,
                       text=True, timeout=300, env=dict(env, RETRO_PIPELINE_KILL_AT="index-add:finalize"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (wd / "report.html").exists()
    r = subprocess.run(build_cli_args(wd, prefix, gpt_tokenizer_path, tiny_bert_dir, 2), capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {wd / 'report.html'}" in r.stderr
    page = (wd / "report.html").read_text()
    data = report_data(page)
    st = status(wd)
    assert all(v == "shown" for v in data["sections"].values()), data["sections"]
    assert len(data["timeline"]["runs"]) == 2
    assert {s: d["events"] for s, d in data["timeline"]["blocks_finished"].items()} == \
        {s: st[s]["blocks"] for s in STAGES}                       # every block finished once over both runs
    events = read_timeline(timeline_path(wd))
    second = {e["pid"] for e in events if e["event"] == "block" and e["run"] == data["timeline"]["runs"][1]}
    first = {e["pid"] for e in events if e["event"] == "block" and e["run"] == data["timeline"]["runs"][0]}
    assert len(first) == 1 and second and not first & second     # the local process, then Ray's workers
    assert data["timeline"]["workers"] == len(first | second)
    ends = {(e["stage"], e["run"]): e for e in events if e["event"] == "stage_end"}
    assert ends[("index-add", data["timeline"]["runs"][1])]["executor"] == "ray"

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium renders the page in this test (apt-get install chromium)"
    png = tmp_path / "page.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,5000", f"file://{wd / 'report.html'}"], capture_output=True, timeout=120,
                   env=dict(os.environ, HOME=str(tmp_path)))
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    # the plots drew: the stage colours fill many pixels (db-build's blue, embed-sampled's orange bars)
    for rgb in ((0x4c, 0x72, 0xb0), (0xdd, 0x84, 0x52)):
        assert (np.abs(img - rgb).sum(axis=2) < 30).sum() > 2000, rgb
