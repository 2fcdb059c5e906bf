"""One real-browser run of the search page: headless Chromium driven by Playwright.

Types a query, checks the results, asks for a caption, pages, clicks a result to search by it and
uploads an image. Screenshots go to the test's temporary folder, or into docs/ (the README shows
one) with ``CLIPKIT_SCREENSHOTS=1 pytest tests/search/test_search_browser.py``. Skips, saying why,
when Playwright or a Chromium binary is missing (.ci/run installs Debian's chromium).
"""
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from clipkit.captioning.captioner import load_captioner
from clipkit.search import IndexReader
from clipkit.search.server import create_app
from clipkit.search.web import ServeConfig, make_server

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).resolve().parents[2] / "docs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    for p in (os.environ.get("CLIPKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


@pytest.fixture(scope="module")
def page_url(built, scorer):
    idx, _ = built
    app = create_app(IndexReader(idx), scorer, ServeConfig(page_size=6, captioner="shapes"), load_captioner)
    server = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set CLIPKIT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS, headless=True)
        yield b
        b.close()


def wait_true(page, js: str, timeout: float = 20.0):
    """Poll ``js`` (a function) in the page until it returns true. (wait_for_function evaluates
    strings with eval, which the page's Content-Security-Policy forbids, as it should.)"""
    end = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {js}")
        page.wait_for_timeout(50)


IMAGES_LOADED = "() => [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"


def test_page_in_chromium(browser, page_url, corpus, tmp_path):
    from playwright.sync_api import expect
    shots = DOCS if os.environ.get("CLIPKIT_SCREENSHOTS") == "1" else tmp_path
    _, folder, _, _ = corpus
    page = browser.new_page(viewport={"width": 1180, "height": 820})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_url)
    expect(page.locator("#info")).to_contain_text("images")

    # 1. type a query: red circles come first, each with a thumbnail and a score
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_selector(".result img")
    cards = page.locator(".result")
    assert cards.count() == 6
    paths = page.locator(".result .path").all_inner_texts()
    red = ("img00", "img01", "img02", "img03", "dup_a", "dup_b", "s005")
    assert all(any(r in p for r in red) for p in paths), paths
    scores = [float(s) for s in page.locator(".result .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    wait_true(page, IMAGES_LOADED)
    assert "a red circle" in page.inner_text("#status")

    # 2. caption this (the bundled captioner), then the screenshot the README shows
    page.locator(".result .caption-btn").nth(3).click()
    expect(page.locator(".result .caption").nth(3)).to_contain_text("\u201c")
    assert page.locator(".result .caption").nth(3).inner_text().strip()
    page.mouse.move(0, 0)
    page.screenshot(path=str(shots / "search_page.png"))

    # 3. the next page continues the ranks
    page.click("#next")
    expect(page.locator(".result .meta span").first).to_have_text("#7")
    page.click("#prev")
    expect(page.locator(".result .meta span").first).to_have_text("#1")

    # 4. click a result: it becomes the query and comes back first with cosine 1
    third = page.locator(".result").nth(2)
    clicked = third.locator(".path").inner_text()
    third.locator("img").click()
    expect(page.locator("#status")).to_have_text(re.compile("^similar to"))
    assert page.locator(".result .path").first.inner_text() == clicked
    assert float(page.locator(".result .score").first.inner_text()) == pytest.approx(1, abs=1e-3)

    # 5. upload an image as the query: the same picture comes back first
    page.set_input_files("#upload", str(folder / "img06.png"))
    expect(page.locator("#status")).to_have_text(re.compile("^image img06.png"))
    assert page.locator(".result .path").first.inner_text().endswith("img06.png")
    wait_true(page, IMAGES_LOADED)
    page.screenshot(path=str(shots / "search_page_upload.png"))
    assert page.get_attribute("#export", "href").startswith("/api/export?qid=")
    assert not errors, errors
    assert (shots / "search_page.png").stat().st_size > 10_000
    page.close()
