"""The build report: one self-contained HTML page of what a workdir holds and how its build went.

``retro-pipeline report --workdir W`` writes it (``W/report.html``) and ``build`` ends by writing it;
:func:`render_report` gives the page as a string (for a web page that serves it). It reads only what exists:

- per stage, its state, blocks, wall time and counts as ``retro-pipeline status`` computes them
  (:func:`retro_pipeline.pipeline.status`), its throughput, and from the timeline (``W/logs/timeline.jsonl``,
  :class:`retro_pipeline.executor.base.Timeline`) its one-off job time, retries, lost workers and runs;
- a worker timeline: every finished block as a bar on the row of the worker process that made it;
- chunk lengths in GPT and embedder tokens (the train DB's own ``bert_len`` column: the build's embedder
  tokenizer's count, recorded by db-build) and the invalid chunks, from a bounded sample of rows;
- corpus and split sizes per dataset of the blend;
- the recall / queries-per-second table that index-add measured (``search.json``), with the tuned point;
- for a bounded sample of pretraining chunks: the similarity of each to its saved neighbors, the share of
  missing (-1) neighbors per rank, and the texts of a few of them with their neighbors.

Neighbor similarities are computed by embedding the sampled chunks and their saved neighbors with the
build's encoder, not by reconstructing neighbors from the index: the query chunks are in no index (they
must be embedded anyway), reconstruction gives compressed vectors for PQ/SQ codes and needs the whole index
in memory (an IVF direct map; an on-disk or sharded index), while embedding a few hundred chunks costs the
same seconds for any index and measures what the encoder itself says about the pairs.

Everything is bounded (samples of rows, never a scan of the DB), so the report takes seconds on a large
workdir. Plots are matplotlib SVG inlined in the page (opens offline); matplotlib is imported here only.
A machine-readable copy of every number is embedded as JSON (``<script id="report-data">``).
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from retro_pipeline.errors import RetroError
from retro_pipeline.io import atomic_path, read_json

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
ROW_SAMPLE = 20_000        # chunk-DB rows read for the length histograms (in windows spread over the DB)
NEIGHBOR_ROWS = 20_000     # neighbor rows read for the missing-per-rank shares
SIMILARITY_SAMPLE = 16     # pretraining chunks embedded with their neighbors (0: no encoder loaded)
SIMILARITY_RANKS = 5       # of each, the neighbors embedded (the first ranks)
EXAMPLES = 3               # chunks shown with their neighbors' texts
MAX_WORKER_ROWS = 64       # rows of the worker timeline (the busiest workers)
MAX_BARS = 4000            # bars of the worker timeline before neighbouring bars of a worker are merged
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def render_report(workdir, similarity_sample: int = SIMILARITY_SAMPLE) -> str:
    """The report of ``workdir`` (a path or :class:`~retro_pipeline.workdir.Workdir`) as one HTML string."""
    return _Report(workdir, similarity_sample).html()


def write_report(workdir, output=None, similarity_sample: int = SIMILARITY_SAMPLE) -> Path:
    """Write the report atomically to ``output`` (default ``W/report.html``); returns its path."""
    from retro_pipeline.workdir import Workdir

    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    text = render_report(wd, similarity_sample)
    path = Path(output).expanduser().absolute() if output else wd.root / REPORT_NAME
    try:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    except OSError as e:
        raise RetroError(f"{path}: cannot write the report there ({e.strerror}); pass an --output you can write "
                         f"to") from None
    return path


# ---------------------------------------------------------------------- reading


def _sample_rows(dset, n: int, windows: int = 20) -> np.ndarray:
    """At most ``n`` rows of an HDF5 dataset: all of a small one, else ``windows`` contiguous runs spread
    evenly over it (contiguous reads: cheap on any chunked layout)."""
    total = dset.shape[0]
    if total <= n:
        return dset[...]
    per = max(1, n // windows)
    starts = np.linspace(0, total - per, windows).astype(np.int64)
    return np.concatenate([dset[s:s + per] for s in starts])


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0}
    q = np.percentile(x, [50, 99])
    return {"n": int(len(x)), "mean": round(float(np.mean(x)), 3), "p50": float(q[0]), "p99": float(q[1]),
            "max": float(np.max(x)), "min": float(np.min(x))}


def worker_name(rec: dict) -> str:
    """How the timeline names the worker of a block: host:pid, and the GPU it used."""
    name = f"{rec.get('host') or '?'}:{rec.get('pid') or '?'}"
    return name + (f" gpu{rec['gpu']}" if rec.get("gpu") is not None else "")


class _Report:
    def __init__(self, workdir, similarity_sample: int):
        from retro_pipeline.pipeline import stage_order, status
        from retro_pipeline.read import WorkdirReader
        from retro_pipeline.workdir import Workdir

        self.wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
        if not self.wd.root.is_dir():
            raise RetroError(f"{self.wd.root}: no such directory; give the --workdir of a build")
        self.status = status(self.wd)  # not a workdir: a one-line error here
        self.order = stage_order()
        self.reader = WorkdirReader(self.wd)
        self.cfg = self.reader.config
        self.similarity_sample = max(0, int(similarity_sample))
        self.data: dict[str, Any] = {"version": 1, "workdir": str(self.wd.root),
                                     "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"), "sections": {}}
        self.plots: dict[str, str] = {}
        self.encoder = None
        from retro_pipeline.executor.base import read_timeline, timeline_path

        self.events = read_timeline(timeline_path(self.wd.root))

    def done(self, stage: str) -> bool:
        return self.status.get(stage, {}).get("state") == "done"

    def not_yet(self, *stages: str) -> str | None:
        """'not run yet' and why, where one of ``stages`` is not done; None where all are."""
        for s in stages:
            st = self.status.get(s, {})
            if st.get("state") == "partial":
                return f"not run yet: {s} is partial ({st.get('blocks_done', 0)} of {st.get('blocks_total', 0)} blocks)"
            if st.get("state") != "done":
                return f"not run yet: {s} has not started"
        return None

    # ---- sections: each fills self.data[name] (and plots) and returns its HTML body
    def section(self, name: str, title: str, fn) -> str:
        try:
            body = fn()
            self.data["sections"][name] = "shown"
        except _NotYet as e:
            self.data["sections"][name] = str(e)
            body = f'<p class="notyet">{html.escape(str(e))}</p>'
        except Exception as e:  # noqa: BLE001 - one section that fails must not hide the others
            log.debug("report section %s failed", name, exc_info=True)
            msg = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.data["sections"][name] = msg
            body = f'<p class="error">could not be computed ({html.escape(msg)})</p>'
        return f'<section id="{name}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'

    def html(self) -> str:
        parts = [
            self.section("stages", "Stages: wall time and throughput", self.stages),
            self.section("timeline", "Worker timeline", self.timeline),
            self.section("chunks", "Chunk lengths", self.chunks),
            self.section("datasets", "Corpora and splits", self.datasets),
            self.section("search", "Search: recall against nprobe / efSearch", self.search),
            self.section("neighbors", "Neighbors", self.neighbors),
            self.section("examples", "Samples and their neighbors", self.examples),
        ]
        return _page(self.wd.root, self.data, self.header(), parts)

    def header(self) -> str:
        cfg = self.cfg
        stale = {s: st["stale"] for s, st in self.status.items() if st.get("stale")}
        rows = [("workdir", str(self.wd.root)), ("data path", " ".join(map(str, cfg.data_path or []))),
                ("embedder", str(cfg.embedder)), ("chunk length", cfg.chunk_length),
                ("index", (read_json(self.wd.index_info_path) or {}).get("index_str", cfg.index_str)),
                ("generated", self.data["generated"])]
        out = _table(["", ""], rows, cls="kv", header=False)
        if stale:
            self.data["stale"] = stale
            out += "".join(f'<p class="error">{html.escape(s)} is stale, made from what changed since: '
                           f'{html.escape(w)}</p>' for s, w in stale.items())
        return out

    # ---- stages
    def stage_rows(self) -> dict[str, int]:
        """Rows each finished stage made: chunks (documents for db-build), from its done marker."""
        st = self.status
        out = {}
        d = st.get("db-build", {})
        if d.get("state") == "done":
            out["db-build"] = int(d.get("n_chunks_train", 0) + d.get("n_chunks_valid", 0) + d.get("n_chunks_invalid", 0))
        for s, key in (("embed-sampled", "n_chunks"), ("index-train", "n_train_vectors"),
                       ("index-add", "n_chunks_added")):
            if st.get(s, {}).get("state") == "done":
                out[s] = int(st[s].get(key, 0))
        q = st.get("query-neighbors", {})
        if q.get("state") == "done":
            out["query-neighbors"] = int(sum(q.get(f"n_chunks_{s}", 0) for s in ("train", "valid", "test")))
        return out

    def corpus_tokens(self) -> list[int]:
        from retro_pipeline.corpus import IndexedDataset

        return [int(len(IndexedDataset(p, validate=False).tokens)) for _, p in self.cfg.blend()]

    def stages(self) -> str:
        ends = [e for e in self.events if e["event"] == "stage_end"]
        rows_made = self.stage_rows()
        tokens: dict[str, tuple[float, str]] = {}
        if "db-build" in rows_made:
            tokens["db-build"] = (float(sum(self.corpus_tokens())), "GPT")
        if "query-neighbors" in rows_made:
            tokens["query-neighbors"] = (float(rows_made["query-neighbors"] * self.cfg.chunk_length), "GPT")
        mean_bert = self.mean_bert_len()
        for s in ("embed-sampled", "index-add"):
            n = rows_made.get(s, 0) if s == "embed-sampled" else self.status[s].get("n_chunks_embedded", 0)
            if n and mean_bert is not None:  # index-add: only the chunks it embedded (not those it reused)
                tokens[s] = (float(n * mean_bert), "embedder ≈")
        table, rows = [], []
        for s in self.order:
            st = self.status[s]
            mine = [e for e in ends if e.get("stage") == s]
            rec = {"stage": s, "state": st["state"], "stale": st.get("stale"),
                   "blocks_done": st.get("blocks", st.get("blocks_done", 0)) if st["state"] == "done"
                   else st.get("blocks_done", 0),
                   "blocks_total": st.get("blocks", st.get("blocks_total", 0)) if st["state"] == "done"
                   else st.get("blocks_total", 0),
                   "seconds": st.get("seconds") if st["state"] == "done" else None,
                   "once_seconds": round(sum(e.get("once", 0) for e in mine), 3),
                   "retries": sum(int(e.get("retries", 0)) for e in mine),
                   "lost_workers": sum(int(e.get("lost", 0)) for e in mine),
                   "runs": len({e["run"] for e in mine})}
            sec = rec["seconds"]
            if s in rows_made:
                rec["rows"] = rows_made[s]
                rec["chunks_per_s"] = round(rows_made[s] / sec, 1) if sec else None
            if s in tokens:
                rec["tokens"], rec["tokens_kind"] = tokens[s]
                rec["tokens_per_s"] = round(tokens[s][0] / sec, 1) if sec else None
            table.append(rec)
            state = st["state"] + (" (stale)" if st.get("stale") else "")
            rows.append([s, state, f"{rec['blocks_done']} / {rec['blocks_total']}",
                         _num(sec, 2) if sec is not None else "—", _num(rec.get("rows")),
                         _num(rec.get("chunks_per_s"), 1),
                         (_num(rec.get("tokens_per_s"), 0) + f" {rec['tokens_kind']}") if "tokens_per_s" in rec
                         and rec["tokens_per_s"] is not None else "—",
                         _num(rec["once_seconds"], 2) if mine else "—", rec["retries"] if mine else "—",
                         rec["lost_workers"] if mine else "—", rec["runs"] if mine else "—"])
        self.data["stages"] = table
        self.data["runs"] = self.runs()
        head = ["stage", "state", "blocks", "wall s", "chunks", "chunks/s", "tokens/s", "one-off s", "retries",
                "lost workers", "runs"]
        out = _table(head, rows, keys=["stage", "state", "blocks", "seconds", "rows", "chunks_per_s",
                                       "tokens_per_s", "once_seconds", "retries", "lost_workers", "runs"])
        out += ('<p class="note">wall s: as <code>retro-pipeline status</code> gives it (every run of the stage, '
                'summed); chunks: documents\' chunks for db-build, chunks embedded / added / searched for the '
                'others; tokens/s: GPT tokens of the corpora (db-build) or of the searched chunks, embedder tokens '
                '(≈: chunks × the mean embedder length of the sampled rows) for embedding stages; one-off s: '
                'finalize and merge jobs; from the timeline where the build recorded one.</p>')
        if any(r.get("seconds") for r in table):
            out += self.plot("stage_times", self.plot_stage_times, table, ends)
        if self.data["runs"]:
            out += _table(["run", "started", "stages", "blocks finished", "ended"],
                          [[r["run"], r["started"], ", ".join(r["stages"]) or "—", r["blocks"], r["ended"]]
                           for r in self.data["runs"]], cls="runs")
        return out

    def runs(self) -> list[dict]:
        runs: dict[str, dict] = {}
        for e in self.events:
            r = runs.setdefault(e["run"], {"run": e["run"], "t0": e.get("time", 0), "stages": [], "blocks": 0,
                                           "ended": "—"})
            if e["event"] == "stage_start" and e["stage"] not in r["stages"]:
                r["stages"].append(e["stage"])
            elif e["event"] == "block":
                r["blocks"] += 1
            elif e["event"] == "stage_end":
                r["ended"] = f"{e['stage']}: {e.get('state')}"
        for r in runs.values():
            r["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.pop("t0")))
        return list(runs.values())

    def plot_stage_times(self, ax, table, ends):
        names = [r["stage"] for r in table if r.get("seconds")]
        total = [r["seconds"] for r in table if r.get("seconds")]
        once = [min(r["once_seconds"], r["seconds"]) for r in table if r.get("seconds")]
        y = np.arange(len(names))[::-1]
        ax.barh(y, np.subtract(total, once), color=COLORS[0], label="blocks (and planning)")
        ax.barh(y, once, left=np.subtract(total, once), color=COLORS[1], label="one-off jobs (finalize, merges)")
        ax.set_yticks(y, names)
        ax.set_xlabel("wall seconds (all runs)")
        ax.legend(loc="lower right", fontsize=8)

    # ---- worker timeline
    def timeline(self) -> str:
        blocks = [e for e in self.events if e["event"] == "block" and e.get("start") is not None]
        if not blocks:
            raise _NotYet("not run yet: no block has finished with a timeline recorded (builds of earlier "
                          "versions record none)")
        per_stage: dict[str, dict[str, int]] = {}
        for e in blocks:
            d = per_stage.setdefault(e["stage"], {"events": 0, "blocks": set()})
            d["events"] += 1
            d["blocks"].add(e["block"])
        workers = sorted({worker_name(e) for e in blocks})
        lost = [e for e in self.events if e["event"] == "worker_lost"]
        self.data["timeline"] = {
            "runs": list(dict.fromkeys(e["run"] for e in blocks)), "workers": len(workers), "lost_worker_events": len(lost),
            "blocks_finished": {s: {"events": d["events"], "distinct": len(d["blocks"])} for s, d in per_stage.items()}}
        out = self.plot("worker_timeline", self.plot_timeline, blocks, lost,
                        size=(11, 1.2 + 0.28 * min(len(workers), MAX_WORKER_ROWS)))
        busy = {}
        for e in blocks:
            busy[worker_name(e)] = busy.get(worker_name(e), 0.0) + (e["end"] - e["start"])
        out += ('<p class="note">One row per worker process (host:pid, and its GPU where it used one); each bar is '
                'a finished block, colored by stage (blocks embedded together share their group\'s time by size). '
                'Runs are laid side by side: the time between them is left out. Gaps in a row are idle time; a '
                'bar that ends long after the others is a straggler.</p>')
        out += _table(["worker", "blocks", "busy s"],
                      [[w, sum(1 for e in blocks if worker_name(e) == w), _num(busy[w], 2)] for w in workers[:200]],
                      cls="workers")
        return out

    def plot_timeline(self, ax, blocks, lost):
        # runs side by side: each run's own span, a small gap between them
        spans: dict[str, list[float]] = {}
        for e in self.events:
            t = [e.get("time", 0)] + ([e["start"], e["end"]] if e["event"] == "block" else [])
            s = spans.setdefault(e["run"], [min(t), max(t)])
            s[0], s[1] = min(s[0], *t), max(s[1], *t)
        order = sorted(spans, key=lambda r: spans[r][0])
        total = sum(spans[r][1] - spans[r][0] for r in order) or 1.0
        shift, at = {}, 0.0
        for r in order:
            shift[r] = at - spans[r][0]
            at += spans[r][1] - spans[r][0] + 0.03 * total
        busy: dict[str, float] = {}
        for e in blocks:
            busy[worker_name(e)] = busy.get(worker_name(e), 0.0) + e["end"] - e["start"]
        shown = sorted(busy, key=lambda w: -busy[w])[:MAX_WORKER_ROWS]
        first = {}
        for e in blocks:
            w = worker_name(e)
            first[w] = min(first.get(w, float("inf")), e["start"] + shift[e["run"]])
        shown.sort(key=lambda w: first[w])
        row = {w: i for i, w in enumerate(shown)}
        stages = [s for s in self.order if any(e["stage"] == s for e in blocks)]
        bars: dict[tuple[str, str], list[list[float]]] = {}
        for e in sorted(blocks, key=lambda e: e["start"] + shift[e["run"]]):
            w = worker_name(e)
            if w in row:
                bars.setdefault((w, e["stage"]), []).append([e["start"] + shift[e["run"]], e["end"] + shift[e["run"]]])
        if sum(len(v) for v in bars.values()) > MAX_BARS:  # merge neighbouring bars of a worker and stage
            eps = at / 1500
            for k, v in bars.items():
                merged = [v[0]]
                for a, b in v[1:]:
                    if a - merged[-1][1] <= eps:
                        merged[-1][1] = max(merged[-1][1], b)
                    else:
                        merged.append([a, b])
                bars[k] = merged
        for (w, s), v in bars.items():
            c = COLORS[self.order.index(s) % len(COLORS)]
            ax.broken_barh([(a, max(b - a, at / 5000)) for a, b in v], (row[w] - 0.4, 0.8), facecolors=c)
        from matplotlib.patches import Patch

        handles = [Patch(color=COLORS[self.order.index(s) % len(COLORS)], label=s) for s in stages]
        for r in order[1:]:
            ax.axvline(spans[r][0] + shift[r], color="#888", lw=0.8, ls="--")
        if lost:
            xs = [e["time"] + shift[e["run"]] for e in lost if e["run"] in shift]
            handles += ax.plot(xs, [-0.8] * len(xs), "x", color="#c44e52", label="worker lost")
        ax.set_yticks(range(len(shown)), shown, fontsize=7)
        ax.set_ylim(len(shown) - 0.4, -1.2)
        ax.set_xlim(0, at)
        ax.set_xlabel("seconds" + (" (runs side by side, dashed: a new run)" if len(order) > 1 else ""))
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(6, len(handles)),
                  fontsize=8, frameon=False)

    # ---- chunk lengths
    def mean_bert_len(self) -> float | None:
        c = self.chunk_sample()
        return None if c is None or not len(c) else float(c[:, 4].mean())

    def chunk_sample(self) -> np.ndarray | None:
        if not hasattr(self, "_chunks"):
            self._chunks = None
            if self.done("db-build"):
                import h5py

                with h5py.File(self.wd.merged_db_path("train"), "r") as f:
                    self._chunks = _sample_rows(f["chunks"], ROW_SAMPLE)
        return self._chunks

    def invalid_sample(self) -> np.ndarray:
        import h5py

        files = sorted((self.wd.db_dir / "individual").glob("*/*.hdf5"))
        if len(files) > 32:
            files = [files[i] for i in np.linspace(0, len(files) - 1, 32).astype(int)]
        parts, n = [], 0
        for p in files:
            with h5py.File(p, "r") as f:
                part = f["chunks_invalid"][:ROW_SAMPLE - n]
            parts.append(part)
            n += len(part)
            if n >= ROW_SAMPLE:
                break
        return np.concatenate(parts) if parts else np.zeros((0, 4), np.uint32)

    def chunks(self) -> str:
        why = self.not_yet("db-build")
        if why:
            raise _NotYet(why)
        c = self.chunk_sample()
        inv = self.invalid_sample()
        gpt = (c[:, 3].astype(np.int64) - c[:, 2]) if len(c) else np.zeros(0)
        bert = c[:, 4].astype(np.int64) if len(c) else np.zeros(0)
        inv_gpt = (inv[:, 2].astype(np.int64) - inv[:, 1]) if len(inv) else np.zeros(0)
        d = self.status["db-build"]
        max_len = self.embedder_max_length()
        n_train = int(d.get("n_chunks_train", 0))
        self.data["chunks"] = {"rows_sampled": int(len(c)), "of_rows": n_train, "gpt_tokens": _stats(gpt),
                               "embedder_tokens": _stats(bert), "n_chunks_invalid": int(d.get("n_chunks_invalid", 0)),
                               "invalid_gpt_tokens": _stats(inv_gpt), "embedder_max_length": max_len}
        if max_len and len(bert):
            # the encoder adds its special tokens ([CLS] ... [SEP]: 2 for BERT-style models) within max_length
            self.data["chunks"]["truncated_share_sampled"] = round(float((bert + 2 > max_len).mean()), 4)
        rows = [["GPT tokens", *_stat_cells(self.data["chunks"]["gpt_tokens"])],
                ["embedder tokens", *_stat_cells(self.data["chunks"]["embedder_tokens"])],
                ["invalid chunks: GPT tokens", *_stat_cells(self.data["chunks"]["invalid_gpt_tokens"])]]
        out = _table(["", "rows sampled", "mean", "median", "p99", "max"], rows)
        inv_n = self.data["chunks"]["n_chunks_invalid"]
        total = n_train + int(d.get("n_chunks_valid", 0)) + inv_n
        spread = "20 runs of rows spread over the DB" if n_train > ROW_SAMPLE else "all of them"
        out += (f'<p>{_num(len(c))} of {_num(n_train)} train-DB chunks sampled ({spread}). Invalid chunks (no embedder token: never embedded nor indexed): '
                f'<b data-k="n_chunks_invalid">{_num(inv_n)}</b> of {_num(total)} '
                f'({100 * inv_n / max(1, total):.2f}%). Embedder tokens are the DB\'s <code>bert_len</code>, the '
                f'count the build\'s embedder tokenizer gives each chunk.'
                + (f' The encoder reads at most {max_len} tokens with its special tokens; '
                   f'{100 * self.data["chunks"].get("truncated_share_sampled", 0):.2f}% of the sampled chunks are '
                   f'longer and are cut.' if max_len else '') + '</p>')
        out += self.plot("chunk_lengths", self.plot_chunks, gpt, bert, inv_gpt, max_len, size=(11, 3.4), ncols=2)
        return out

    def embedder_max_length(self) -> int | None:
        """The encoder's token limit, where the report loads the encoder anyway (for neighbor similarities)."""
        enc = self.load_encoder() if self.similarity_sample and self.done("query-neighbors") else None
        return int(enc.max_length) if enc is not None else None

    def plot_chunks(self, axes, gpt, bert, inv_gpt, max_len):
        cl = self.cfg.chunk_length
        bins = np.arange(0, cl + 2) - 0.5 if cl <= 128 else 64
        axes[0].hist(gpt, bins=bins, color=COLORS[0], label="valid chunks")
        if len(inv_gpt):
            axes[0].hist(inv_gpt, bins=bins, color=COLORS[3], alpha=0.7, label="invalid chunks (sample)")
        axes[0].set_xlabel("GPT tokens per chunk")
        from matplotlib.ticker import MaxNLocator

        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel("chunks (sample)")
        axes[0].legend(fontsize=8)
        top = int(max(bert.max() if len(bert) else 1, max_len or 0)) + 1
        axes[1].hist(bert, bins=np.arange(0, top + 2) - 0.5 if top <= 200 else 64, color=COLORS[2])
        if max_len:
            axes[1].axvline(max_len - 2, color="#c44e52", ls="--", lw=1, label=f"encoder limit ({max_len} with special tokens)")
            axes[1].legend(fontsize=8)
        axes[1].set_xlabel("embedder tokens per chunk")

    # ---- datasets
    def datasets(self) -> str:
        why = self.not_yet("db-build")
        if why:
            raise _NotYet(why)
        infos = self.reader.db_infos()
        tokens = self.corpus_tokens()
        q = self.status.get("query-neighbors", {})
        rows, recs = [], []
        for i, (d, t) in enumerate(zip(infos, tokens)):
            rec = {"dataset": i, "prefix": d["prefix"], "ratio": d["ratio"], "n_tokens": t, "n_docs": d["n_docs"],
                   "n_docs_train": d["n_docs_train"], "n_chunks": d["n_chunks"], "n_chunks_train": d["n_chunks_train"],
                   "n_chunks_valid": d["n_chunks"] - d["n_chunks_train"], "n_chunks_invalid": d["n_chunks_invalid"],
                   "n_chunks_sampled": d.get("n_chunks_sampled", 0)}
            recs.append(rec)
            rows.append([i, Path(d["prefix"]).name, _num(d["ratio"], 3), _num(t), _num(d["n_docs"]),
                         _num(d["n_docs_train"]), _num(d["n_chunks"]), _num(d["n_chunks_train"]),
                         _num(rec["n_chunks_valid"]), _num(d["n_chunks_invalid"]), _num(rec["n_chunks_sampled"])])
        samples = {s: q.get(f"n_samples_{s}") for s in ("train", "valid", "test")} if q.get("state") == "done" else None
        self.data["datasets"] = recs
        self.data["samples"] = samples
        out = _table(["#", "corpus", "weight", "tokens", "docs", "train docs", "chunks", "train chunks",
                      "valid chunks", "invalid chunks", "index-training sample"], rows,
                     keys=["dataset", "prefix", "ratio", "n_tokens", "n_docs", "n_docs_train", "n_chunks",
                           "n_chunks_train", "n_chunks_valid", "n_chunks_invalid", "n_chunks_sampled"])
        out += (f'<p>Split <code>{html.escape(str(self.cfg.split))}</code> ({html.escape(str(self.cfg.split_mode))} '
                f'mode): the train documents make the train DB (what is indexed and retrieved); the others\' chunks '
                f'are the valid DB. ')
        if samples:
            out += "Megatron's pretraining samples: " + ", ".join(
                f'{s} <b data-k="n_samples_{s}">{_num(n)}</b>' for s, n in samples.items() if n is not None) + "."
        else:
            out += "Pretraining samples: not run yet (query-neighbors)."
        out += "</p>"
        out += self.plot("datasets", self.plot_datasets, recs, size=(8, 1.4 + 0.5 * len(recs)))
        return out

    def plot_datasets(self, ax, recs):
        y = np.arange(len(recs))[::-1]
        names = [f"{r['dataset']}: {Path(r['prefix']).name}" for r in recs]
        left = np.zeros(len(recs))
        for key, label, c in (("n_chunks_train", "train chunks", COLORS[0]), ("n_chunks_valid", "valid chunks", COLORS[1]),
                              ("n_chunks_invalid", "invalid chunks", COLORS[3])):
            v = np.array([r[key] for r in recs], float)
            ax.barh(y, v, left=left, color=c, label=label)
            left += v
        ax.set_yticks(y, names)
        ax.set_xlabel("chunks")
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)

    # ---- search
    def search(self) -> str:
        why = self.not_yet("index-add")
        if why:
            raise _NotYet(why)
        s = self.reader.search_params()
        table = s.get("table") or []
        k = s.get("k")
        self.data["search"] = {key: s.get(key) for key in ("index_str", "params", "target_recall", "recall@10",
                                                           f"recall@{k}", "k", "n_queries", "table")}
        knobs = [key for key in ("nprobe", "efSearch") if any(key in r for r in table)]
        rk = f"recall@{k}"
        rows = []
        for r in table:
            tuned = all(r.get(kn) == s["params"].get(kn) for kn in knobs) and bool(knobs)
            rows.append([*[r.get(kn, "—") for kn in knobs], _num(r.get("recall@10"), 4),
                         *([_num(r.get(rk), 4)] if rk != "recall@10" else []), _num(r.get("queries_per_second"), 1),
                         "tuned" if tuned else ""])
        params = ", ".join(f"{a} {b}" for a, b in (s.get("params") or {}).items()) or "none (an exact index)"
        out = (f'<p>Index <code>{html.escape(str(s.get("index_str")))}</code>: tuned search settings '
               f'<b data-k="params">{html.escape(params)}</b>, recall@10 <b data-k="recall@10">{s.get("recall@10")}</b>'
               f' (target {s.get("target_recall")}), measured on {s.get("n_queries")} queries against the exact '
               f'top-{k} of every chunk.</p>')
        out += _table([*knobs, "recall@10", *([rk] if rk != "recall@10" else []), "queries/s", ""], rows,
                      keys=[*knobs, "recall@10", *([rk] if rk != "recall@10" else []), "queries_per_second", "tuned"],
                      cls="search")
        if knobs:
            out += self.plot("recall", self.plot_recall, s, table, knobs, size=(8, 3.6))
        else:
            out += '<p class="note">This index has no search setting to tune: no recall curve.</p>'
        return out

    def plot_recall(self, ax, s, table, knobs):
        for i, kn in enumerate(knobs):
            rows = [r for r in table if kn in r]
            x = [r[kn] for r in rows]
            ax.plot(x, [r["recall@10"] for r in rows], "o-", color=COLORS[i], label=f"recall@10 vs {kn}")
            if kn in s["params"]:
                hit = [r for r in rows if r[kn] == s["params"][kn]]
                if hit:
                    ax.plot([hit[0][kn]], [hit[0]["recall@10"]], "*", ms=16, color="#c44e52",
                            label=f"tuned: {kn} {s['params'][kn]}")
        if s.get("target_recall") is not None:
            ax.axhline(s["target_recall"], color="#888", ls="--", lw=1, label=f"target {s['target_recall']}")
        from matplotlib.ticker import FuncFormatter, NullLocator

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(" / ".join(knobs))
        ax.set_ylabel("recall@10")
        ax2 = ax.twinx()
        kn = knobs[0]
        rows = [r for r in table if kn in r]
        ax2.plot([r[kn] for r in rows], [r.get("queries_per_second", 0) for r in rows], "s:", color="#937860",
                 label="queries/s")
        ax2.set_ylabel("queries / s")
        ax2.spines["right"].set_visible(True)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)

    # ---- neighbors: a bounded sample of pretraining chunks
    def neighbor_sample(self):
        """(split, sampled chunk rows, their saved neighbors, every-rank sample of neighbor rows)."""
        if hasattr(self, "_nsample"):
            return self._nsample
        import h5py

        dirs = self.wd.stored().get("retro_neighbor_dirs") or {}
        split = next((s for s in ("train", "valid", "test") if dirs.get(s) and self.status["query-neighbors"].get(
            f"n_chunks_{s}")), None)
        if split is None:
            self._nsample = None
            return None
        files = self.reader.neighbor_files(split)
        n = files[-1][1]
        want = max(self.similarity_sample, EXAMPLES)
        rows = np.unique(np.linspace(0, n - 1, min(want, n)).astype(np.int64))
        nb = np.zeros((len(rows), self.cfg.num_neighbors_save), np.int64)
        bulk, got = [], 0
        per_file = max(1, NEIGHBOR_ROWS // len(files))
        for a, b, p in files:
            sel = rows[(rows >= a) & (rows < b)]
            if not len(sel) and got >= NEIGHBOR_ROWS:   # a big build has many files: open only those sampled
                continue
            with h5py.File(p, "r") as f:
                if len(sel):
                    nb[np.searchsorted(rows, sel)] = f["neighbors"][sel - a]
                if got < NEIGHBOR_ROWS:
                    part = f["neighbors"][:per_file]
                    bulk.append(part)
                    got += len(part)
        self._nsample = (split, rows, nb, np.concatenate(bulk))
        return self._nsample

    def neighbors(self) -> str:
        why = self.not_yet("query-neighbors")
        if why:
            raise _NotYet(why)
        q = self.status["query-neighbors"]
        k_save = self.cfg.num_neighbors_save
        n_chunks = int(sum(q.get(f"n_chunks_{s}", 0) for s in ("train", "valid", "test")))
        ntotal = int(self.status.get("index-add", {}).get("n_chunks_added", 0)) or None
        k_query = min(self.cfg.num_neighbors_query, ntotal) if ntotal else self.cfg.num_neighbors_query
        missing, dropped = int(q.get("n_neighbors_missing", 0)), int(q.get("n_dropped_own_sample", 0))
        rec = {"n_chunks": n_chunks, "num_neighbors_save": k_save, "num_neighbors_query": k_query,
               "n_neighbors_missing": missing, "missing_share": missing / max(1, n_chunks * k_save),
               "n_dropped_own_sample": dropped, "dropped_share": dropped / max(1, n_chunks * k_query)}
        self.data["neighbors"] = rec
        out = (f'<p>{_num(n_chunks)} pretraining chunks searched for {k_query} ids each, {k_save} saved. Missing '
               f'(-1) neighbors: <b data-k="n_neighbors_missing">{_num(missing)}</b> '
               f'({100 * rec["missing_share"]:.3f}% of saved slots). Dropped as hits in the sample\'s own '
               f'documents: <b data-k="n_dropped_own_sample">{_num(dropped)}</b> '
               f'({100 * rec["dropped_share"]:.3f}% of the ids searched).</p>')
        ns = self.neighbor_sample()
        if ns is not None:
            split, _, _, bulk = ns
            per_rank = (bulk < 0).mean(axis=0) if len(bulk) else np.zeros(k_save)
            rec["missing_by_rank_sampled"] = [round(float(x), 5) for x in per_rank]
            rec["rows_sampled_for_ranks"] = int(len(bulk))
            out += self.plot("missing_by_rank", self.plot_missing, per_rank, len(bulk), split, size=(8, 2.6))
            if not per_rank.any():
                out += f'<p class="note">No missing neighbor in the {_num(len(bulk))} {split} chunks sampled.</p>'

        out += self.similarity()
        return out

    def plot_missing(self, ax, per_rank, n, split):
        ax.bar(np.arange(1, len(per_rank) + 1), 100 * per_rank, color=COLORS[3])
        ax.set_xlabel("neighbor rank")
        ax.set_ylabel("% missing (-1)")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"missing neighbors by rank, {n} {split} chunks sampled", fontsize=9)
        ax.set_ylim(0, max(1.0, 100 * float(np.max(per_rank)) * 1.2 if len(per_rank) else 1.0))

    def load_encoder(self):
        if self.encoder is None:
            from retro_pipeline.stages.embed import load_encoder

            self.encoder = load_encoder(self.cfg)
        return self.encoder

    def query_texts(self, split: str, rows: np.ndarray) -> list[str]:
        ss = self.reader.samples(split)
        L, cl = ss.L, ss.chunk_length
        toks = np.stack([ss.tokens(int(r // L), int(r // L) + 1)[0, :ss.seq_length].reshape(L, cl)[int(r % L)]
                         for r in rows]) if len(rows) else np.zeros((0, cl), np.int64)
        bounds = np.arange(len(toks) + 1, dtype=np.int64) * cl
        return self.reader.chunk_reader.gpt.detokenize_flat(toks.reshape(-1), bounds)

    def neighbor_texts(self, ids: np.ndarray) -> dict[int, str]:
        ids = np.unique(ids[ids >= 0])
        if not len(ids):
            return {}
        rows = self.reader.db_rows("train", ids)
        return dict(zip(ids.tolist(), self.reader.chunk_texts(rows)))

    def similarity(self) -> str:
        ns = self.neighbor_sample()
        if ns is None or not self.similarity_sample:
            why = "no split has neighbors" if ns is None else "--similarity-sample 0"
            self.data["similarity"] = {"skipped": why}
            return f'<p class="notyet">Neighbor similarities: not computed ({why}).</p>'
        split, rows, nb, _ = ns
        rows, nb = rows[:self.similarity_sample], nb[:self.similarity_sample, :SIMILARITY_RANKS]
        enc = self.load_encoder()
        texts = self.query_texts(split, rows)
        ntext = self.neighbor_texts(nb)
        ids = sorted(ntext)
        q = enc.encode(texts)
        v = enc.encode([ntext[i] for i in ids]) if ids else np.zeros((0, q.shape[1]), np.float32)
        rng = np.random.default_rng(0)
        n_db = self.reader.db_num_chunks("train")
        rand = np.unique(rng.integers(0, n_db, size=min(n_db, len(rows))))
        rv = enc.encode(self.reader.chunk_texts(self.reader.db_rows("train", rand)))

        def unit(x):
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

        q, v, rv = unit(q), unit(v), unit(rv)
        where = {i: j for j, i in enumerate(ids)}
        sims = np.full(nb.shape, np.nan)
        for a in range(len(nb)):
            for m in range(nb.shape[1]):
                if nb[a, m] >= 0:
                    sims[a, m] = float(q[a] @ v[where[int(nb[a, m])]])
        base = (rv @ rv.T)[np.triu_indices(len(rv), 1)] if len(rv) > 1 else np.zeros(0)
        self._sims = sims
        ok = sims[~np.isnan(sims)]
        self.data["similarity"] = {"metric": "cosine", "split": split, "n_query_chunks": int(len(rows)),
                                   "n_pairs": int(len(ok)), "all_ranks": _stats(ok), "rank1": _stats(sims[:, 0][~np.isnan(sims[:, 0])]),
                                   "random_pairs": _stats(base)}
        out = (f'<p>Cosine similarity of {len(rows)} {split} chunks (spread over the split) to their first '
               f'{nb.shape[1]} saved neighbors, both embedded now with the build\'s encoder; random pairs of train-DB chunks for comparison. '
               f'(Embedding the sample rather than reconstructing vectors from the index: the query chunks are in no '
               f'index, and reconstruction would need the whole index in memory and give compressed vectors.)</p>')
        out += self.plot("similarity", self.plot_similarity, sims, base, size=(8, 3.2))
        return out

    def plot_similarity(self, ax, sims, base):
        ok = sims[~np.isnan(sims)]
        lo = float(min(ok.min() if len(ok) else 0, base.min() if len(base) else 0))
        bins = np.linspace(np.floor(lo * 20) / 20, 1.0, 41)
        if len(base):
            ax.hist(base, bins=bins, density=True, color="#bbbbbb", label="random pairs")
        ax.hist(ok, bins=bins, density=True, alpha=0.75, color=COLORS[0], label="every saved neighbor")
        r1 = sims[:, 0][~np.isnan(sims[:, 0])]
        ax.hist(r1, bins=bins, density=True, histtype="step", lw=2, color="#c44e52", label="rank-1 neighbor")
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=8, loc="upper left")

    # ---- examples
    def examples(self) -> str:
        why = self.not_yet("query-neighbors")
        if why:
            raise _NotYet(why)
        ns = self.neighbor_sample()
        if ns is None:
            raise _NotYet("no split has neighbors")
        split, rows, nb, _ = ns
        pick = np.unique(np.linspace(0, len(rows) - 1, min(EXAMPLES, len(rows))).astype(int))
        texts = self.query_texts(split, rows[pick])
        ntext = self.neighbor_texts(nb[pick][:, :3])
        sims = getattr(self, "_sims", None)
        L = self.cfg.seq_length // self.cfg.chunk_length
        out, recs = [], []
        for i, t in zip(pick, texts):
            r = int(rows[i])
            items = []
            for m, c in enumerate(nb[i][:3]):
                c = int(c)
                sim = sims[i, m] if sims is not None and i < len(sims) and m < sims.shape[1] and \
                    not np.isnan(sims[i, m]) else None
                items.append(f'<li>#{c} ' + (f'<span class="sim">cos {sim:.3f}</span> ' if sim is not None else "")
                             + f'<span class="text">{html.escape(ntext[c])}</span></li>' if c >= 0 else
                             '<li>(none)</li>')
            recs.append({"split": split, "chunk": r, "sample": r // L, "neighbors": [int(x) for x in nb[i][:3]]})
            out.append(f'<div class="example"><p><b>{split} sample {r // L}, chunk {r % L}</b> (chunk row {r}): '
                       f'<span class="text">{html.escape(t)}</span></p><ol>{"".join(items)}</ol></div>')
        self.data["examples"] = recs
        return "\n".join(out)

    # ---- plots
    def plot(self, name: str, fn, *args, size=(9, 3.2), ncols: int = 1) -> str:
        import matplotlib
        from matplotlib.figure import Figure

        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "retro-pipeline", "font.size": 9,
                                    "axes.spines.top": False, "axes.spines.right": False}):
            fig = Figure(figsize=size)
            axes = fig.subplots(1, ncols)
            fn(axes, *args)
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        svg = buf.getvalue()
        svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg[svg.index("<svg"):], flags=re.S)
        self.plots[name] = svg
        self.data.setdefault("plots", []).append(name)
        return f'<figure class="plot" id="plot-{name}">{svg}</figure>'


class _NotYet(Exception):
    """A section whose inputs do not exist yet: it says so instead of its content."""


# ---------------------------------------------------------------------- HTML


def _num(x, digits: int = 0) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, np.integer)) or (digits == 0 and float(x).is_integer()):
        return f"{int(x):,}"
    return f"{float(x):,.{digits}f}"


def _stat_cells(s: dict) -> list[str]:
    if not s.get("n"):
        return ["0", "—", "—", "—", "—"]
    return [_num(s["n"]), _num(s["mean"], 2), _num(s["p50"], 1), _num(s["p99"], 1), _num(s["max"])]


def _table(head: list[str], rows: list[list], keys: list[str] | None = None, cls: str = "", header: bool = True) -> str:
    """An HTML table; ``keys`` names each column in a ``data-k`` attribute of its cells (for readers of the page)."""
    out = [f'<table class="{cls}">']
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            k = f' data-k="{html.escape(keys[i])}"' if keys else ""
            cells.append(f"<td{k}>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1100px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; } table.kv td:first-child { font-weight: 600; }
p.note { color: #666; font-size: 12px; } p.notyet { color: #888; font-style: italic; }
p.error { color: #b00; } figure.plot { margin: 8px 0; } figure.plot svg { max-width: 100%; height: auto; }
.example { border-left: 3px solid #4c72b0; padding-left: 10px; margin: 12px 0; font-size: 13px; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; background: #f7f7f7; }
.sim { color: #4c72b0; font-size: 12px; }
"""


def _page(root: Path, data: dict, header: str, sections: list[str]) -> str:
    blob = json.dumps(data, sort_keys=True, default=_json_default).replace("</", "<\\/")
    nav = " · ".join(f'<a href="#{n}">{n}</a>' for n in data["sections"])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>retro-pipeline report: {html.escape(root.name)}</title><style>{CSS}</style></head><body>\n'
            f'<h1>retro-pipeline build report: {html.escape(str(root))}</h1>\n{header}\n<p>{nav}</p>\n'
            + "\n".join(sections)
            + f'\n<script type="application/json" id="report-data">{blob}</script>\n</body></html>\n')


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, set):
        return sorted(x)
    return str(x)
