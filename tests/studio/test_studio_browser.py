"""The studio in a real browser: headless Chromium driven by Playwright, on the bundled models.

A generation end to end (the step counter advances, a denoised preview shows, the picture lands in
the gallery, its caption, "same seed again" regenerates the same bytes), a caption of an uploaded
image, a rerank of uploaded images, a cancel (the job stops, no further steps) and the search tab.
Screenshots of each tab go to the test's temporary folder, or into docs/ (the README shows them) with
``CLIPKIT_SCREENSHOTS=1 pytest tests/studio/test_studio_browser.py`` (which also generates with more
steps, for a cleaner picture). Skips, saying why, when Playwright or a Chromium binary is missing.
"""
import json
import os
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from clipkit.search import IndexReader
from clipkit.search.web import make_server
from clipkit.studio import StudioConfig, create_studio_app

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).resolve().parents[2] / "docs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = os.environ.get("CLIPKIT_SCREENSHOTS") == "1"


def chromium_path() -> str | None:
    for p in (os.environ.get("CLIPKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


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


@pytest.fixture(scope="module")
def studio_url(built, shapes_scorer, tmp_path_factory):
    idx, _ = built
    out = tmp_path_factory.mktemp("studio_browser") / "studio-out"
    app = create_studio_app(StudioConfig(out=str(out), captioner="shapes", page_size=6), IndexReader(idx),
                            shapes_scorer)
    server = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    app.extensions["clipkit_studio"].queue.close()
    server.shutdown()
    server.server_close()


def api(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_true(page, js: str, timeout: float = 60.0):
    """Poll ``js`` (a function) in the page until it returns true (wait_for_function would eval a
    string, which the page's Content-Security-Policy forbids, as it should)."""
    end = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {js}")
        page.wait_for_timeout(40)


def shot(page, folder: Path, name: str):
    page.mouse.move(0, 0)
    page.screenshot(path=str(folder / name))


def test_studio_in_chromium(browser, studio_url, corpus, tmp_path):
    from playwright.sync_api import expect
    shots = DOCS if SHOTS else tmp_path
    _, folder, _, _ = corpus
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(studio_url + "#generate")
    expect(page.locator("#models")).to_contain_text("profile shapes")
    assert page.locator("#tabs a:visible").count() == 5

    extra = [("a blue square at the bottom right", 1), ("a yellow triangle in the center", 1),
             ("a green circle on the left", 0)] if SHOTS else []                   # a fuller gallery to show
    for prompt, seed in extra:
        page.fill("#gen-prompt", prompt)
        page.fill("#gen-seed", str(seed))
        page.fill("#gen-steps", "25")
        page.fill("#gen-best-of", "1")
        page.click("#gen-go")
        expect(page.locator("#gen-status")).to_have_attribute("data-state", "done", timeout=60_000)

    # 1. generate: the counter advances, a denoised preview shows, the picture lands in the gallery
    page.fill("#gen-prompt", "a red circle at the top left")
    page.fill("#gen-seed", "3")
    page.fill("#gen-steps", "25" if SHOTS else "8")
    page.fill("#gen-best-of", "1")
    page.click("#gen-go")
    counts, previews, taken = [], 0, False
    end = time.monotonic() + 60
    while page.get_attribute("#gen-status", "data-state") not in ("done", "failed", "cancelled"):
        assert time.monotonic() < end, page.inner_text("#gen-status")
        n = int(page.inner_text("#gen-step") or 0)
        if not counts or counts[-1] != n:
            counts.append(n)
        shown = page.evaluate("() => { const i = document.getElementById('gen-preview');"
                              " return !i.hidden && i.complete && i.naturalWidth > 0 ? 1 : 0; }")
        previews += shown
        if SHOTS and shown and 10 <= n < 20 and not taken:
            shot(page, shots, "studio-generate.png")                             # part-way, with a preview
            taken = True
        page.wait_for_timeout(25)
    assert page.get_attribute("#gen-status", "data-state") == "done", page.inner_text("#gen-status")
    assert counts == sorted(counts) and len([c for c in counts if c > 0]) >= 2, counts
    assert previews > 0
    expect(page.locator("#gen-results .thumb")).to_have_count(1)
    wait_true(page, "() => [...document.querySelectorAll('#gen-results img, #gen-preview')]"
                    ".every(i => i.complete && i.naturalWidth > 0)")
    assert page.inner_text("#gen-step") == page.inner_text("#gen-total") == ("25" if SHOTS else "8")
    if not SHOTS:
        shot(page, shots, "studio-generate.png")

    # 2. the gallery: the picture with its sidecar, its caption, "same seed again" = the same bytes
    page.click("#tabs a[data-tab=gallery]")
    expect(page.locator(".pic")).to_have_count(1 + len(extra))
    card = page.locator(f'.pic[data-id="{page.locator(".pic").first.get_attribute("data-id")}"]')
    expect(card.locator(".prompt")).to_have_text("a red circle at the top left")
    expect(card.locator(".seed")).to_have_text("seed 3")
    sha = card.get_attribute("data-sha256")
    assert re.fullmatch(r"[0-9a-f]{64}", sha)
    card.locator(".caption-btn").click()
    expect(card.locator(".caption")).to_contain_text("\u201c", timeout=30_000)
    card.locator(".again").click()
    expect(card.locator(".card-status")).to_contain_text("the same bytes", timeout=30_000)
    pictures = 2 + len(extra)
    expect(page.locator(".pic")).to_have_count(pictures)
    assert page.locator(".pic").first.get_attribute("data-sha256") == sha          # the new file, first
    listed = api(studio_url + "api/gallery")["images"]
    assert [g["sha256"] for g in listed[:2]] == [sha, sha] and listed[0]["id"] != listed[1]["id"]
    wait_true(page, "() => [...document.querySelectorAll('.pic img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, shots, "studio-gallery.png")

    # 3. caption an uploaded image: greedy and beam, each candidate with its CLIP score
    page.click("#tabs a[data-tab=caption]")
    page.set_input_files("#cap-file", str(folder / "img00.png"))
    expect(page.locator("table.cands tr")).to_have_count(6, timeout=30_000)      # header + 5 candidates
    assert "circle" in page.locator(".cap-best .big").first.inner_text()
    scores = page.locator("table.cands td.num").all_inner_texts()
    assert len(scores) == 10 and all(-1 <= float(s) <= 1 for s in scores[::2])
    shot(page, shots, "studio-caption.png")

    # 4. rerank uploaded images by a text query
    page.click("#tabs a[data-tab=rerank]")
    names = ["img04.png", "img00.png", "img06.png", "img01.png", "img07.png", "img03.png", "img09.png", "img10.png"]
    page.fill("#rr-query", "a red circle")
    page.set_input_files("#rr-files", [str(folder / n) for n in names])           # submits on choice
    expect(page.locator(".ranked")).to_have_count(len(names), timeout=30_000)
    ranked = page.locator(".ranked .path").all_inner_texts()
    assert set(ranked[:3]) <= {"img00.png", "img01.png", "img03.png"}, ranked
    rr = [float(s) for s in page.locator(".ranked .score").all_inner_texts()]
    assert rr == sorted(rr, reverse=True)
    wait_true(page, "() => [...document.querySelectorAll('.ranked img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, shots, "studio-rerank.png")

    # 5. cancel: the job stops, and no step runs after it
    page.click("#tabs a[data-tab=generate]")
    page.fill("#gen-steps", "300")
    page.fill("#gen-seed", "9")
    page.click("#gen-go")
    wait_true(page, "() => +document.getElementById('gen-step').textContent >= 2", timeout=60)
    page.click("#gen-cancel")
    expect(page.locator("#gen-status")).to_have_text(re.compile("^cancelled after"), timeout=30_000)
    job = api(studio_url + "api/jobs/" + page.get_attribute("#gen-status", "data-job"))
    assert job["state"] == "cancelled" and job["step"] - job["steps_at_cancel"] <= 1 and job["step"] < 300
    page.wait_for_timeout(400)
    assert api(studio_url + "api/jobs/" + job["id"])["step"] == job["step"]
    assert page.inner_text("#gen-step") == str(job["step"])
    assert len(api(studio_url + "api/gallery")["images"]) == pictures

    # 6. the search tab of an index
    page.click("#tabs a[data-tab=search]")
    expect(page.locator("#info")).to_contain_text("images")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    expect(page.locator(".result")).to_have_count(6)
    wait_true(page, "() => [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)")
    page.locator(".result .caption-btn").first.click()
    expect(page.locator(".result .caption").first).to_contain_text("\u201c", timeout=30_000)
    shot(page, shots, "studio-search.png")
    assert not errors, errors
    assert all((shots / f"studio-{t}.png").stat().st_size > 10_000
               for t in ("generate", "gallery", "caption", "rerank", "search"))
    page.close()
