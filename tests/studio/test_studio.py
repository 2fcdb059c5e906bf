"""The studio's Flask app (`clipkit serve`): generation jobs with progress, previews and cancel, one at a
time on a queue; the gallery (same seed again = the same bytes); caption and rerank uploads; hostile
uploads, foreign Host headers and cross-origin requests answered with 4xx JSON while the server keeps
serving. The page in a real browser: test_studio_browser.py."""
import hashlib
import io
import json
import os
import time
import zipfile

import pytest
from click.testing import CliRunner
from PIL import Image

from clipkit.cli.main import cli

from studio_helpers import flat_png, wait_job   # tests/studio/ is on sys.path (no __init__.py)

FINISHED = ("done", "failed", "cancelled")


def png(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def submit(client, **fields) -> dict:
    r = client.post("/api/generate", data={k: str(v) for k, v in fields.items()})
    assert r.status_code == 202, r.data
    return r.get_json()


def still_serving(client):
    r = client.get("/api/info")
    assert r.status_code == 200 and "generate" in r.get_json()["tabs"]


def test_page_and_info(client):
    r = client.get("/")
    assert r.status_code == 200 and b'id="gen-form"' in r.data and b'id="tab-gallery"' in r.data
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    for name in ("studio.js", "app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    info = client.get("/api/info").get_json()
    assert info["tabs"] == ["generate", "gallery", "caption", "rerank"]          # no index: no search tab
    s = info["studio"]
    assert s["profile"] == "shapes" and s["diffusion"] == "shapes" and s["captioner"] == "shapes"
    assert s["defaults"]["best_of"] == 3 and s["defaults"]["negative"] == ["{prompt} and another shape:4"]
    assert not os.path.isabs(s["out"])


def test_generate_progress_preview_gallery_and_same_bytes_as_the_api(client, tmp_path):
    """Steps advance, previews come, the picture lands in the gallery with its sidecar; the same seed
    through clipkit.generate (the CLI's function) and "same seed again" give the same bytes."""
    import clipkit
    seen = []
    job = wait_job(client, submit(client, prompt="a red circle", seed=5, steps=6, best_of=1),
                   on_update=lambda j: seen.append((j["step"], j["preview"])))
    assert job["state"] == "done", job
    steps = [s for s, _ in seen]
    assert steps == sorted(steps) and len(set(steps)) >= 3 and job["step"] == job["total"] == 6
    assert any(p is not None and p["step"] < p["steps"] for _, p in seen)        # a denoised estimate, part-way
    prev = client.get(f"/api/jobs/{job['id']}/preview.png")
    assert prev.status_code == 200 and Image.open(io.BytesIO(prev.data)).size == (32, 32)
    [made] = job["images"]
    assert made["seed"] == 5 and made["prompt"] == "a red circle" and made["parameters"]["steps"] == 6
    assert not made["name"].startswith("/") and made["name"].endswith("/a-red-circle-5.png")
    data = client.get(made["image"]).data
    assert hashlib.sha256(data).hexdigest() == made["sha256"]
    gallery = client.get("/api/gallery").get_json()
    assert made["id"] in [g["id"] for g in gallery["images"]]

    api = clipkit.generate("a red circle", n=1, seed=5, steps=6, best_of=1, out_dir=tmp_path / "api")
    assert open(api.images[0].path, "rb").read() == data                         # page = API
    res = CliRunner().invoke(cli, ["-q", "generate", "a red circle", "-n", "1", "--seed", "5", "--steps", "6",
                                   "--best-of", "1", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "a-red-circle-5.png").read_bytes() == data        # = CLI

    again = wait_job(client, client.post(f"/api/gallery/{made['id']}/again", json={"vary": False}).get_json())
    assert again["state"] == "done" and again["images"][0]["sha256"] == made["sha256"]
    assert again["images"][0]["id"] != made["id"]                                # a new file, the same bytes
    vary = wait_job(client, client.post(f"/api/gallery/{made['id']}/again", json={"vary": True}).get_json())
    assert vary["state"] == "done" and vary["images"][0]["seed"] != 5
    assert vary["images"][0]["parameters"]["steps"] == 6

    cap = wait_job(client, client.post(f"/api/gallery/{made['id']}/caption").get_json())
    assert cap["state"] == "done" and cap["result"]["caption"] and -1 <= cap["result"]["clip_score"] <= 1
    listed = {g["id"]: g for g in client.get("/api/gallery").get_json()["images"]}
    assert listed[made["id"]]["caption"]["caption"] == cap["result"]["caption"]   # kept for the page

    z = zipfile.ZipFile(io.BytesIO(client.get(made["download"]).data))
    assert sorted(z.namelist()) == ["a-red-circle-5.json", "a-red-circle-5.png"]
    assert z.read("a-red-circle-5.png") == data and json.loads(z.read("a-red-circle-5.json"))["seed"] == 5
    side = client.get(made["sidecar"])
    assert side.status_code == 200 and side.get_json()["parameters"]["steps"] == 6
    thumb = client.get(made["thumb"])
    assert thumb.status_code == 200 and thumb.data == data                       # 32 px: the PNG itself


def test_two_generations_never_run_at_once(client):
    """The second request waits, saying its place, and starts only after the first finished."""
    a = submit(client, prompt="a blue square", seed=1, steps=6, best_of=1)
    b = submit(client, prompt="a green triangle", seed=2, steps=6, best_of=1)
    assert b["state"] == "queued" and b["ahead"] == 1 and b["place"] == 2
    q = client.get("/api/jobs").get_json()
    assert [j["id"] for j in q["waiting"]][-1] == b["id"]
    a, b = wait_job(client, a), wait_job(client, b)
    assert a["state"] == b["state"] == "done", (a["error"], b["error"])
    assert a["finished"] <= b["started"]


def test_cancel_stops_within_one_step(client):
    before = client.get("/api/gallery").get_json()["total"]
    job = submit(client, prompt="a yellow circle", seed=3, steps=200, best_of=1)
    waiting = submit(client, prompt="a red square", seed=4, steps=6, best_of=1)
    end = time.monotonic() + 60
    while job["step"] < 2:
        assert time.monotonic() < end
        job = client.get(f"/api/jobs/{job['id']}?after={job['version']}&wait=5").get_json()
    dropped = client.post(f"/api/jobs/{waiting['id']}/cancel").get_json()
    assert dropped["state"] == "cancelled"                                       # a waiting job: at once
    asked = client.post(f"/api/jobs/{job['id']}/cancel").get_json()
    job = wait_job(client, job)
    assert job["state"] == "cancelled" and "cancelled" in job["error"]
    assert job["step"] - asked["steps_at_cancel"] <= 1, (asked["steps_at_cancel"], job["step"])
    assert job["step"] < job["total"] == 200
    time.sleep(0.3)
    assert client.get(f"/api/jobs/{job['id']}").get_json()["step"] == job["step"]   # no further steps
    assert client.get(f"/api/jobs/{waiting['id']}").get_json()["started"] is None
    assert client.get("/api/gallery").get_json()["total"] == before


def test_init_image_and_image_prompt_uploads(client, studio_app):
    """Uploads are kept under --out/uploads (re-encoded PNG); the sidecar names them; same seed again works."""
    out = studio_app.extensions["clipkit_studio"].out
    r = client.post("/api/generate", data={"prompt": "a green square", "seed": "7", "steps": "6", "best_of": "1",
                                           "strength": "0.6", "init_image": (io.BytesIO(png((0, 0, 200))), "b.png"),
                                           "image_prompt": (io.BytesIO(png((0, 200, 0), (40, 30))), "g.png"),
                                           "image_prompt_weight": "0.5"},
                    content_type="multipart/form-data")
    assert r.status_code == 202, r.data
    job = wait_job(client, r.get_json())
    assert job["state"] == "done", job["error"]
    p = job["images"][0]["parameters"]
    assert p["init_image"].startswith("uploads/") and p["image_prompts"][0][0].startswith("uploads/")
    assert p["strength"] == 0.6 and p["image_prompts"][0][1] == 0.5
    ups = sorted(os.listdir(out / "uploads"))
    assert len(ups) == 2 and all(u.endswith(".png") for u in ups)
    again = wait_job(client, client.post(f"/api/gallery/{job['images'][0]['id']}/again").get_json())
    assert again["state"] == "done" and again["images"][0]["sha256"] == job["images"][0]["sha256"]


def test_caption_and_rerank_uploads(client):
    r = client.post("/api/caption-image", data={"image": (io.BytesIO(png()), "red.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 202, r.data
    cap = wait_job(client, r.get_json())["result"]
    assert cap["greedy"]["caption"] and cap["beam"]["caption"] and len(cap["beam"]["candidates"]) == 5
    assert all(-1 <= c["clip_score"] <= 1 for c in cap["beam"]["candidates"])
    from helpers import render, scene
    ims = render([scene("square", "blue", "center"), scene("circle", "red", "center"),
                  scene("triangle", "green", "top")])
    files = []
    for name, im in zip(("blue.png", "red.png", "green.png"), ims):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        files.append((io.BytesIO(buf.getvalue()), name))
    r = client.post("/api/rerank", data={"query": "a red circle", "images": files}, content_type="multipart/form-data")
    assert r.status_code == 202, r.data
    res = wait_job(client, r.get_json())["result"]
    assert [x["rank"] for x in res["results"]] == [1, 2, 3] and res["results"][0]["name"] == "red.png"
    scores = [x["score"] for x in res["results"]]
    assert scores == sorted(scores, reverse=True)


BOMB = flat_png(10_000, 10_000, "1")        # 100 Mpx > the 89 Mpx guard, 12 KiB on disk


@pytest.mark.parametrize("route, field, data, code", [
    ("/api/caption-image", "image", BOMB, 413),                          # a decompression bomb
    ("/api/caption-image", "image", b"\0" * (50 << 20), 413),            # 50 MB
    ("/api/caption-image", "image", b"GIF89a not really", 400),          # not an image
    ("/api/caption-image", "image", b"", 400),                           # empty
    ("/api/caption-image", "image", png()[:60], 400),                    # truncated
    ("/api/rerank", "images", BOMB, 413),
    ("/api/rerank", "images", b"%PDF-1.4", 400),
    ("/api/generate", "init_image", BOMB, 413),
    ("/api/generate", "image_prompt", b"<svg/>", 400),
    ("/api/generate", "init_image", b"\0" * (3 << 20), 413),             # over --max-upload (2 MiB here)
], ids=["bomb", "50MB", "not-image", "empty", "truncated", "rerank-bomb", "rerank-pdf", "init-bomb", "svg",
        "init-3MB"])
def test_hostile_uploads_are_4xx_and_the_server_keeps_serving(client, route, field, data, code):
    form = {field: (io.BytesIO(data), "x.png"), "query": "a red circle", "prompt": "a red circle"}
    r = client.post(route, data=form, content_type="multipart/form-data")
    assert r.status_code == code, (r.status_code, r.data[:300])
    assert "error" in r.get_json() and b"Traceback" not in r.data
    still_serving(client)


@pytest.mark.parametrize("method, url, kw, code", [
    ("post", "/api/generate", {"data": {}}, 400),                                  # no prompt
    ("post", "/api/generate", {"data": {"prompt": "a", "steps": "0"}}, 400),
    ("post", "/api/generate", {"data": {"prompt": "a", "steps": "1e9"}}, 400),
    ("post", "/api/generate", {"data": {"prompt": "a", "clip_scale": "nan"}}, 400),
    ("post", "/api/generate", {"data": {"prompt": "a", "seed": "-1"}}, 400),
    ("post", "/api/generate", {"data": {"prompt": "a", "seed": "99999999999999999999999"}}, 400),
    ("post", "/api/generate", {"json": {"prompt": "a", "best_of": True}}, 400),
    ("post", "/api/generate", {"data": {"prompt": "x" * 5000}}, 400),
    ("get", "/api/jobs/nope", {}, 404),
    ("get", "/api/jobs/nope/preview.png", {}, 404),
    ("post", "/api/jobs/nope/cancel", {}, 404),
    ("get", "/api/jobs/x?after=abc&wait=1", {}, 404),
    ("get", "/gallery/0123456789abcdef/image.png", {}, 404),
    ("get", "/gallery/..%2f..%2fetc%2fpasswd/image.png", {}, 404),
    ("get", "/gallery/../../etc/passwd", {}, 404),
    ("post", "/api/gallery/0123456789abcdef/again", {}, 404),
    ("post", "/api/rerank", {"data": {"query": "a"}}, 400),                        # no images
    ("post", "/api/rerank", {"data": {"query": " ", "images": (io.BytesIO(b"x"), "a.png")}}, 400),
    ("post", "/api/caption-image", {"data": {}}, 400),
    ("get", "/image/99999999999999999999999999", {}, 404),                         # no index: no such route
    ("delete", "/api/generate", {}, 405),
    ("get", "/static/../app.py", {}, 404),
])
def test_bad_requests_are_4xx_json(client, method, url, kw, code):
    r = getattr(client, method)(url, **kw)
    assert r.status_code == code, (r.status_code, r.data[:300])
    assert "error" in r.get_json() and b"Traceback" not in r.data
    still_serving(client)


def test_foreign_host_and_cross_origin_requests_are_refused(client):
    evil = client.get("/api/info", headers={"Host": "attacker.example:8000"})      # DNS rebinding
    assert evil.status_code == 421 and "Host" in evil.get_json()["error"]
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 421
    for ok in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert client.get("/api/info", headers={"Host": ok}).status_code == 200, ok
    upload = {"image": (io.BytesIO(png()), "a.png")}
    for origin in ("http://attacker.example", "null", "http://localhost:9999"):
        r = client.post("/api/caption-image", data=dict(upload), content_type="multipart/form-data",
                        headers={"Origin": origin})
        assert r.status_code == 403 and "error" in r.get_json(), origin
        upload = {"image": (io.BytesIO(png()), "a.png")}
    r = client.post("/api/generate", data={"prompt": "a red circle"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert client.get("/api/gallery", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    page = client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert page.status_code == 200                                               # a link to the page is fine
    same = client.post("/api/caption-image", data={"image": (io.BytesIO(png()), "a.png")},
                       content_type="multipart/form-data",
                       headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 202
    wait_job(client, same.get_json())


def test_gallery_never_follows_links_and_regenerates_only_its_own_uploads(client, studio_app, tmp_path):
    out = studio_app.extensions["clipkit_studio"].out
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    (tmp_path / "secret.json").write_text(json.dumps({"prompt": "x", "seed": 1, "parameters": {}}))
    (out / "linked").mkdir()
    os.symlink(secret, out / "linked" / "s-1.png")
    os.symlink(tmp_path / "secret.json", out / "linked" / "s-1.json")
    os.symlink(tmp_path, out / "linked-folder")
    names = [g["name"] for g in client.get("/api/gallery").get_json()["images"]]
    assert not any("linked" in n for n in names)
    # a sidecar naming an init image outside --out/uploads is not regenerated from
    hand = out / "hand"
    hand.mkdir()
    (hand / "a-red-circle-9.png").write_bytes(png())
    sidecar = {"prompt": "a red circle", "seed": 9, "models": {"clip": "shapes-noised", "diffusion": "shapes"},
               "parameters": {"steps": 6, "best_of": 1, "init_image": str(secret), "strength": 0.5}}
    (hand / "a-red-circle-9.json").write_text(json.dumps(sidecar))
    entry = next(g for g in client.get("/api/gallery").get_json()["images"] if g["name"] == "hand/a-red-circle-9.png")
    assert entry["parameters"]["init_image"] == "secret.png"                     # no absolute path shown
    r = client.post(f"/api/gallery/{entry['id']}/again")
    assert r.status_code == 400 and "not an upload of this studio" in r.get_json()["error"]
    sidecar["parameters"].pop("init_image")
    sidecar["models"]["diffusion"] = "hf:someone/else"
    (hand / "a-red-circle-9.json").write_text(json.dumps(sidecar))
    r = client.post(f"/api/gallery/{entry['id']}/again")
    assert r.status_code == 400 and "diffusion model" in r.get_json()["error"]
    # an uploads folder replaced by a link is never written through
    had = (out / "uploads").exists()
    if had:
        os.rename(out / "uploads", out / "uploads.real")
    os.symlink(tmp_path, out / "uploads")
    try:
        r = client.post("/api/generate", data={"prompt": "a red circle", "init_image": (io.BytesIO(png()), "a.png")},
                        content_type="multipart/form-data")
        assert r.status_code == 400 and "symbolic link" in r.get_json()["error"]
        assert sorted(os.listdir(tmp_path)) == ["secret.json", "secret.png"]
    finally:
        os.unlink(out / "uploads")
        if had:
            os.rename(out / "uploads.real", out / "uploads")


def test_decode_budget_bounds_concurrent_decoding():
    """Eight threads decoding an 88 Mpx PNG at once: never more than the budget's pixels at full size,
    each result downscaled to max_side."""
    import threading

    from clipkit.search.web import PixelBudget, decode_image
    big = flat_png(6000, 6000)
    budget = PixelBudget(40_000_000)
    sizes, errors = [], []

    def one():
        try:
            sizes.append(decode_image(big, "big.png", budget, max_side=512).size)
        except Exception as e:          # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=one) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and sizes == [(512, 512)] * 4
    assert budget.peak <= 40_000_000 and budget.used == 0


def test_an_unknown_prompt_fails_as_a_job_unless_forced(client):
    """The bundled models know none of these words: the job fails with the pipeline's one-line reason;
    with force it runs (the CLI's --force)."""
    job = wait_job(client, submit(client, prompt="a photo of a dog", seed=1, steps=2, best_of=1))
    assert job["state"] == "failed" and "know none of its words" in job["error"]
    job = wait_job(client, submit(client, prompt="a photo of a dog", seed=1, steps=2, best_of=1, force=1))
    assert job["state"] == "done", job["error"]


def test_out_is_made_at_the_first_write_only(tmp_path):
    from clipkit.core.errors import InputError
    from clipkit.studio import StudioConfig, create_studio_app
    app = create_studio_app(StudioConfig(out=str(tmp_path / "a" / "b")))
    try:
        assert not (tmp_path / "a").exists()                                     # nothing written yet
        assert app.test_client().get("/api/gallery").get_json()["total"] == 0
    finally:
        app.extensions["clipkit_studio"].queue.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        create_studio_app(StudioConfig(out=str(tmp_path / "file")))


def test_the_model_options_reach_every_tab(tmp_path):
    """--clip (the guide and the rerank CLIP) and --captioner none, as `clipkit serve` passes them."""
    from clipkit.studio import StudioConfig, create_studio_app
    app = create_studio_app(StudioConfig(out=str(tmp_path / "out"), clip=("shapes",), captioner=None))
    app.testing = False
    c = app.test_client()
    try:
        s = c.get("/api/info").get_json()["studio"]
        assert s["clip"] == ["shapes"] and s["rerank_clip"] == "shapes" and s["captioner"] is None
        job = wait_job(c, submit(c, prompt="a blue square", seed=2, steps=3, best_of=1))
        assert job["state"] == "done", job["error"]
        assert c.get(job["images"][0]["sidecar"]).get_json()["models"]["clip"] == "shapes"
        again = wait_job(c, c.post(f"/api/gallery/{job['images'][0]['id']}/again").get_json())
        assert again["images"][0]["sha256"] == job["images"][0]["sha256"]
        r = c.post("/api/caption-image", data={"image": (io.BytesIO(png()), "a.png")}, content_type="multipart/form-data")
        assert r.status_code == 503 and "captioner" in r.get_json()["error"]
        assert c.post(f"/api/gallery/{job['images'][0]['id']}/caption").status_code == 503
    finally:
        app.extensions["clipkit_studio"].queue.close()
