"""The Flask app of ``retro-pipeline serve``: server-rendered pages over a :class:`~.browse.Browser`.

Read-only: every route is GET (``/report`` is :func:`retro_pipeline.report.render_report`, rendered once), ids are ``<int:...>`` and splits one of train/valid/test in the URL rules, so
nothing a request carries becomes a path. An id the workdir does not hold is a 404 page (the JSON API: a 404
JSON object) saying what exists; a bad query is a 400. Templates are Jinja2 with autoescaping (``.html``).
"""

from __future__ import annotations

import threading

from flask import Flask, jsonify, render_template, request, url_for

from retro_pipeline.errors import RetroError
from retro_pipeline.samples import SPLITS
from retro_pipeline.web.browse import MAX_K, NEIGHBORS_SHOWN, Browser, NotFound

SPLIT_RULE = f"any({', '.join(SPLITS)})"


def create_app(workdir, allow_changed: bool = False, load: bool = True, warn=None) -> Flask:
    """The app over ``workdir`` (a path, a :class:`~retro_pipeline.workdir.Workdir` or a :class:`Browser`);
    ``load`` loads the encoder and index now rather than on the first search."""
    browser = workdir if isinstance(workdir, Browser) else Browser(workdir, allow_changed, warn=warn)
    if load:
        browser.load()
    app = Flask(__name__)
    app.config["browser"] = browser
    app.json.sort_keys = False

    @app.context_processor
    def common():
        return {"b": browser, "root": str(browser.workdir.root),
                "splits": browser.sample_counts()}

    def k_arg(default: int = 10) -> int:
        raw = request.args.get("k", str(default))
        try:
            k = int(raw)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_K:
            raise RetroError(f"k={raw!r}: give a number of results from 1 to {MAX_K}")
        return k

    @app.get("/")
    def search_page():
        q = request.args.get("q", "")
        results, error = None, None
        try:
            k = k_arg()
            if q.strip():
                results = browser.search(q, k)
        except RetroError as e:
            k, error = 10, str(e)
        return render_template("search.html", q=q, k=k, results=results, error=error,
                               metric=browser.metric), 400 if error else 200

    @app.get("/api/search")
    def api_search():
        try:
            q, k = request.args.get("q", ""), k_arg()
            results = browser.search(q, k)
        except RetroError as e:
            return jsonify({"error": str(e)}), 400
        for r in results:
            r["url"] = url_for("chunk_page", i=r["chunk_id"])
        return jsonify({"query": q, "k": k, "metric": browser.metric, "results": results})

    @app.get("/chunk/<int:i>")
    def chunk_page(i: int):
        return render_template("chunk.html", c=browser.chunk(i))

    @app.get("/api/chunk/<int:i>")
    def api_chunk(i: int):
        return jsonify(browser.chunk(i))

    @app.get(f"/sample/<{SPLIT_RULE}:split>/<int:i>")
    def sample_page(split: str, i: int):
        raw = request.args.get("n", str(NEIGHBORS_SHOWN))
        if not raw.isdigit():
            raise RetroError(f"n={raw!r}: give how many neighbors to show per chunk (0: every saved one)")
        return render_template("sample.html", s=browser.sample(split, i, int(raw)))

    @app.get("/status")
    def status_page():
        return render_template("status.html", rows=browser.status(), search=browser.search_info,
                               index=browser.index_info)

    rendered: list[str] = []   # the report, rendered once on its first visit (it reads and plots the whole build)
    report_lock = threading.Lock()

    @app.get("/report")
    def report_page():
        from retro_pipeline.report import render_report

        with report_lock:
            if not rendered:
                rendered.append(render_report(browser.workdir.root))
        return rendered[0]

    @app.errorhandler(NotFound)
    def not_found(e):
        return _error(str(e), 404)

    @app.errorhandler(404)
    def no_route(e):
        return _error(f"no page at {request.path}: ids are numbers, splits are {', '.join(SPLITS)} (e.g. "
                      f"/chunk/0, /sample/train/0)", 404)

    @app.errorhandler(405)
    def read_only(e):
        return _error(f"{request.method} {request.path}: this server is read-only (GET only)", 405)

    @app.errorhandler(RetroError)
    def retro_error(e):
        return _error(str(e), 400)

    def _error(message: str, code: int):
        if request.path.startswith("/api/"):
            return jsonify({"error": message}), code
        return render_template("error.html", message=message, code=code), code

    return app

