"""search.server: the Flask app behind `clipkit serve` (page, search, paging, export, uploads, thumbnails,
captions, 4xx on bad requests, only indexed unchanged files served). The real process: tests/cli/test_serve.py."""
import io
import json
import os
import shutil

import pytest
from PIL import Image

from clipkit.captioning.captioner import load_captioner
from clipkit.search import IndexReader, build_index
from clipkit.search.server import create_app
from clipkit.search.web import ServeConfig

from helpers import make_images   # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def app(built, scorer):
    idx, _ = built
    a = create_app(IndexReader(idx), scorer, ServeConfig(max_upload=200_000, page_size=5, captioner="shapes"),
                   load_captioner)
    a.testing = False                      # errors go through the handlers, as in production
    return a


@pytest.fixture()
def client(app):
    return app.test_client()


def png_bytes(path) -> bytes:
    return open(path, "rb").read()


def test_page_and_info(client):
    r = client.get("/")
    assert r.status_code == 200 and b'id="q"' in r.data and b"/static/app.js" in r.data
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    info = client.get("/api/info").get_json()
    assert info["items"] == 22 and info["model"] == "shapes" and info["text_queries"] is True


def test_text_search_paging_and_export(client):
    first = client.get("/api/search?q=a red circle&limit=5").get_json()
    assert [r["rank"] for r in first["results"]] == [1, 2, 3, 4, 5] and first["has_more"]
    assert first["results"][0]["thumb"] == f"/thumb/{first['results'][0]['id']}"
    second = client.get(f"/api/search?qid={first['qid']}&offset=5&limit=5").get_json()
    assert [r["rank"] for r in second["results"]] == [6, 7, 8, 9, 10]
    whole = client.get("/api/search?q=a red circle&limit=10").get_json()
    assert [r["path"] for r in whole["results"]] == [r["path"] for r in first["results"] + second["results"]]
    ex = client.get(f"/api/export?qid={first['qid']}&limit=7")
    assert ex.status_code == 200 and "attachment" in ex.headers["Content-Disposition"]
    doc = json.loads(ex.data)
    assert len(doc["results"]) == 7 and doc["query"] == ["a red circle"] and doc["model"] == "shapes"


def test_item_and_upload_queries(client, corpus):
    _, folder, _, _ = corpus
    hits = client.get("/api/search?q=a green square").get_json()["results"]
    by_item = client.get(f"/api/search?id={hits[0]['id']}").get_json()
    assert by_item["results"][0]["id"] == hits[0]["id"] and by_item["results"][0]["score"] == pytest.approx(1, abs=1e-5)
    up = client.post("/api/search", data={"image": (io.BytesIO(png_bytes(folder / "img03.png")), "q.png"),
                                          "limit": "3"}, content_type="multipart/form-data")
    assert up.status_code == 200, up.data
    res = up.get_json()
    assert res["results"][0]["path"].endswith("img03.png") and len(res["results"]) == 3
    nxt = client.get(f"/api/search?qid={res['qid']}&offset=3&limit=3").get_json()     # an upload pages too
    assert [r["rank"] for r in nxt["results"]] == [4, 5, 6]


def test_thumbnails_images_and_caption(client, built):
    r = client.get("/thumb/0")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    im = Image.open(io.BytesIO(r.data))
    assert max(im.size) <= 192
    full = client.get("/image/0")
    assert full.status_code == 200 and full.mimetype == "image/png"
    shard_item = next(it for it in IndexReader(built[0]).alive_items() if it.shard)
    assert client.get(f"/thumb/{shard_item.id}").status_code == 200            # read from the tar shard
    cap = client.post("/api/caption", json={"id": 0})
    assert cap.status_code == 200, cap.data
    assert isinstance(cap.get_json()["caption"], str) and cap.get_json()["caption"]


@pytest.mark.parametrize("method, url, kw, code", [
    ("get", "/api/search", {}, 400),                                     # no query
    ("get", "/api/search?q=a&id=1", {}, 400),                            # two queries
    ("get", "/api/search?q=%20", {}, 400),                               # empty text
    ("get", "/api/search?q=a&limit=0", {}, 400),
    ("get", "/api/search?q=a&limit=abc", {}, 400),
    ("get", "/api/search?q=a&offset=-1", {}, 400),
    ("get", "/api/search?q=a&offset=990&limit=50", {}, 400),             # past the result cap
    ("get", "/api/search?id=99999", {}, 404),
    ("get", "/api/search?qid=nope", {}, 404),
    ("get", "/api/export?qid=nope", {}, 404),
    ("post", "/api/search", {"data": {}}, 400),                          # no file
    ("post", "/api/search", {"data": {"image": (io.BytesIO(b"not an image"), "x.png")},
                             "content_type": "multipart/form-data"}, 400),
    ("post", "/api/search", {"data": {"image": (io.BytesIO(b""), "x.png")},
                             "content_type": "multipart/form-data"}, 400),
    ("post", "/api/search", {"data": {"image": (io.BytesIO(b"\0" * 400_000), "big.png")},
                             "content_type": "multipart/form-data"}, 413),
    ("post", "/api/caption", {"json": {"id": "0"}}, 400),
    ("post", "/api/caption", {"json": {"id": 99999}}, 404),
    ("delete", "/api/search", {}, 405),
    ("get", "/thumb/99999", {}, 404),
    ("get", "/thumb/-1", {}, 404),
    ("get", "/thumb/abc", {}, 404),
    ("get", "/image/../../etc/passwd", {}, 404),                         # no path ever comes from the request
    ("get", "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}, 404),
    ("get", "/static/../server.py", {}, 404),
    ("get", "/static/index.html/../../server.py", {}, 404),
    ("get", "/static/server.py", {}, 404),
    ("get", "/etc/passwd", {}, 404),
])
def test_bad_requests_are_4xx_and_the_server_keeps_serving(client, method, url, kw, code):
    r = getattr(client, method)(url, **kw)
    assert r.status_code == code, (r.status_code, r.data)
    if r.mimetype == "application/json":
        assert "error" in r.get_json()
    assert b"Traceback" not in r.data
    ok = client.get("/api/search?q=a red circle&limit=1")
    assert ok.status_code == 200 and ok.get_json()["results"]


def test_only_indexed_unchanged_files_are_served(tmp_path, scorer):
    """A file replaced by a symlink (to a secret), changed, or removed after indexing is not served."""
    folder = tmp_path / "imgs"
    paths = make_images(folder, 2, 2)
    idx = tmp_path / "s.idx"
    build_index([folder], idx, scorer)
    reader = IndexReader(idx)
    c = create_app(reader, scorer).test_client()
    ids = {it.path: it.id for it in reader.alive_items()}
    secret = tmp_path / "secret.png"
    shutil.copy(paths[3], secret)
    assert c.get(f"/thumb/{ids[str(paths[0])]}").status_code == 200
    os.unlink(paths[0])
    os.symlink(secret, paths[0])                                   # a link planted under an indexed name
    assert c.get(f"/image/{ids[str(paths[0])]}").status_code == 404
    Image.open(paths[1]).rotate(90).save(paths[1])                 # changed since indexed
    assert c.get(f"/image/{ids[str(paths[1])]}").status_code == 404
    os.unlink(paths[3])                                            # gone
    r = c.get(f"/image/{ids[str(paths[3])]}")
    assert r.status_code == 404 and "error" in r.get_json()
    assert c.post("/api/caption", json={"id": ids[str(paths[3])]}).status_code == 404
    assert c.get("/api/search?q=a red circle").status_code == 200


@pytest.mark.parametrize("method, url, kw, code", [
    ("get", "/image/99999999999999999999999999", {}, 404),             # was a 500 (OverflowError)
    ("get", "/thumb/99999999999999999999999999", {}, 404),
    ("get", f"/image/{2 ** 63}", {}, 404),
    ("post", "/api/caption", {"json": {"id": 10 ** 26}}, 404),
    ("post", "/api/caption", {"json": {"id": 1e26}}, 400),
    ("post", "/api/caption", {"json": {"id": -1}}, 404),
    ("get", "/api/search?id=99999999999999999999999999", {}, 400),
])
def test_huge_ids_are_4xx(client, method, url, kw, code):
    r = getattr(client, method)(url, **kw)
    assert r.status_code == code, (r.status_code, r.data)
    assert "error" in r.get_json()
    assert client.get("/api/search?q=a red circle&limit=1").status_code == 200


def test_paths_are_relative_to_the_indexed_sources(client, corpus):
    _, folder, shard, _ = corpus
    res = client.get("/api/search?q=a red circle&limit=30").get_json()["results"]
    paths = [r["path"] for r in res]
    assert not any(p.startswith("/") for p in paths), paths
    assert f"{folder.name}/img03.png" in paths
    assert any(p.startswith(f"{shard.name}#") for p in paths)
    assert any(p.startswith("others/") for p in paths)                          # from the list file
    doc = json.loads(client.get(f"/api/export?qid={client.get('/api/search?q=a').get_json()['qid']}").data)
    assert not any(r["path"].startswith("/") for r in doc["results"]) and not doc["index"].startswith("/")


def test_thumbnails_are_never_stale(tmp_path, scorer):
    """The thumbnail cache is keyed by the file's size and mtime: a changed file is not served from it."""
    folder = tmp_path / "imgs"
    paths = make_images(folder, 1, 2)
    idx = tmp_path / "t.idx"
    build_index([folder], idx, scorer)
    reader = IndexReader(idx)
    c = create_app(reader, scorer).test_client()
    it = next(i for i in reader.alive_items() if i.path == str(paths[0]))
    first = c.get(f"/thumb/{it.id}")
    assert first.status_code == 200 and c.get(f"/thumb/{it.id}").data == first.data      # cached
    Image.open(paths[1]).save(paths[0])                                                  # another picture
    os.utime(paths[0], ns=(it.mtime + 10 ** 9, it.mtime + 10 ** 9))
    assert c.get(f"/thumb/{it.id}").status_code == 404


def test_foreign_host_and_cross_origin(client, corpus):
    _, folder, _, _ = corpus
    r = client.get("/api/search?q=a", headers={"Host": "rebind.attacker.example"})
    assert r.status_code == 421 and "error" in r.get_json()
    assert client.get("/thumb/0", headers={"Host": "evil.example:8000"}).status_code == 421
    up = client.post("/api/search", data={"image": (io.BytesIO(png_bytes(folder / "img03.png")), "q.png")},
                     content_type="multipart/form-data", headers={"Origin": "https://evil.example"})
    assert up.status_code == 403 and "cross-origin" in up.get_json()["error"]
    cap = client.post("/api/caption", json={"id": 0}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cap.status_code == 403
    hot = client.get("/thumb/0", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "image"})
    assert hot.status_code == 403                                                # no hot-linking from elsewhere
    assert client.get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/info").get_json()["tabs"] == ["search"]


def test_host_check_rules():
    from clipkit.search.web import host_allowed
    assert host_allowed("localhost:8000", "127.0.0.1") and host_allowed("[::1]:80", "127.0.0.1")
    assert host_allowed("app.localhost", "127.0.0.1") and host_allowed("127.0.0.1", "127.0.0.1")
    assert not host_allowed("evil.example", "127.0.0.1") and not host_allowed("", "127.0.0.1")
    assert not host_allowed("10.0.0.5:8000", "127.0.0.1")
    assert host_allowed("10.0.0.5:8000", "10.0.0.5") and host_allowed("10.0.0.5", "0.0.0.0")
    assert not host_allowed("evil.example", "0.0.0.0")                             # a name: rebinding
    assert host_allowed("studio.lan", "0.0.0.0", extra=("studio.lan",))


def test_a_port_in_use_is_one_clear_error(app):
    import socket

    from clipkit.core.errors import InputError
    from clipkit.search.web import make_server
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        with pytest.raises(InputError, match=f"port {port} is in use"):
            make_server(app, "127.0.0.1", port)
    finally:
        s.close()
    server = make_server(app, "127.0.0.1", 0)
    assert server.server_port > 0
    server.server_close()
