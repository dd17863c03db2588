"""`retro-pipeline serve` in a real browser (slow tier): headless Chromium from Debian's `chromium` package, driven
by Playwright for Python, against the `serve` command on a small built workdir.

Playwright's own browser download needs the internet, so the tests use the system's chromium
(`executable_path`). Where chromium or playwright is missing they skip, saying so, except in CI (the env var
CI set), where that is a failure: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import free_port, write_corpus
from test_serve import small_build, unique_chunk

pytestmark = pytest.mark.slow


def _chromium() -> str:
    """The system chromium and a working Playwright, or a skip (a failure in CI)."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install -e '.[dev]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing.append("Debian's chromium (apt-get install chromium; make setup-dev does it)")
    if missing:
        why = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(why + " (CI is set: these tests must run there)")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, gpt_tokenizer_path, tiny_bert_dir, corpus_texts):
    """`retro-pipeline serve` on a small build, on a free port of 127.0.0.1; stopped at the end."""
    from retro_pipeline.read import WorkdirReader
    from retro_pipeline.tokenizers import load_gpt_tokenizer
    from retro_pipeline.workdir import Workdir

    chromium = _chromium()
    tmp = tmp_path_factory.mktemp("browser")
    prefix = write_corpus(tmp / "c", load_gpt_tokenizer(gpt_tokenizer_path), [t[:1500] for t in corpus_texts[:40]])
    wd = tmp / "w"
    small_build(wd, prefix, gpt_tokenizer_path, tiny_bert_dir)
    reader = WorkdirReader(Workdir(wd))
    db = reader.db_chunks("train").astype(np.int64)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "retro_pipeline.cli", "serve", "--workdir", str(wd), "--port",
                          str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                with urllib.request.urlopen(url + "/status", timeout=30):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert p.poll() is None, p.communicate()[1]
        yield {"url": url, "texts": reader.chunk_texts(db), "db": db, "chromium": chromium}
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


@pytest.fixture()
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=served["chromium"], args=["--no-sandbox"], headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 900})
            pg.set_default_timeout(60_000)
            yield pg
        finally:
            browser.close()


def test_search_a_phrase_then_click_through_to_a_sample_with_neighbors(served, page):
    c = unique_chunk(served["db"], served["texts"])
    page.goto(served["url"] + "/")
    page.fill("input[name=q]", served["texts"][c])
    page.click("button[type=submit]")
    first = page.locator("#results tr.result").first
    assert first.locator("a.chunk-link").inner_text() == f"#{c}"
    first.locator("a.chunk-link").click()
    assert page.url.endswith(f"/chunk/{c}")
    assert page.locator("#chunk-text").inner_text().strip() == served["texts"][c].strip()
    links = page.locator("a.sample-link")
    assert links.count() > 0, "the chunk is in no pretraining sample"
    links.first.click()
    assert "/sample/" in page.url
    assert page.locator(".sample-chunk").count() == 4                       # 64-token samples of 16-token chunks
    assert page.locator(".sample-chunk li.neighbor").count() > 0
    text = page.locator(".sample-chunk").first.inner_text()
    assert "neighbors" in text and "#" in text


def test_a_bad_id_shows_the_error_page(served, page):
    r = page.goto(served["url"] + "/chunk/99999999")
    assert r.status == 404
    assert "chunk 99999999 does not exist" in page.locator("#error-message").inner_text()
    r = page.goto(served["url"] + "/sample/train/99999999")
    assert r.status == 404 and "does not exist" in page.locator("#error-message").inner_text()
    body = json.loads(page.goto(served["url"] + "/api/chunk/99999999").text())
    assert "does not exist" in body["error"]


def test_the_report_page_renders_its_plots(served, page):
    from io import BytesIO

    from PIL import Image

    page.set_default_timeout(300_000)   # the first visit renders the report
    page.goto(served["url"] + "/")
    page.click("text=Report")
    assert page.url.endswith("/report")
    svgs = page.locator("svg")
    assert svgs.count() > 0
    for n in range(svgs.count()):
        box = svgs.nth(n).bounding_box()
        assert box is not None and box["width"] > 50 and box["height"] > 50, (n, box)
    shot = Image.open(BytesIO(svgs.first.screenshot())).convert("RGB")
    colours = len(shot.getcolors(maxcolors=1 << 24))
    assert colours > 20, f"the first plot looks blank: {colours} colours"
