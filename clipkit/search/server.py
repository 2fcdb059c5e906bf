"""The local web page of ``clipkit serve``: a Flask app over one opened index.

Routes (JSON errors ``{"error": ...}`` with a 4xx status; the server keeps serving after any of them):

* ``GET  /``                      the page (plain HTML + JS, no build step)
* ``GET  /api/info``              model, items, structure, whether captioning is available
* ``GET  /api/search?q=TEXT``     text query; ``?id=N`` the item N as the query; ``?qid=T`` a page of an
                                  earlier query; each with ``offset`` and ``limit`` (paging)
* ``POST /api/search``            multipart ``image``: an uploaded image as the query (bounded size,
                                  decoded by the robust loader)
* ``GET  /api/export?qid=T``      a result set as a JSON download (``limit``, default 100)
* ``POST /api/caption``           ``{"id": N}`` -> a caption of item N by the captioner
* ``GET  /thumb/N``, ``/image/N`` the image of item N (a thumbnail / the full picture, re-encoded)

Files are served by item id only, never by a path from the request, and only while they are the
file that was indexed (same real path, a regular file, same size and mtime): no path traversal,
no symlink planted after indexing is followed elsewhere.
"""
from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from clipkit.core.errors import ClipkitError, InputError
from clipkit.search.query import MAX_TOP, search_vectors
from clipkit.search.store import IndexReader, ItemNotFound

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """Settings of the page's server (shown by /api/info)."""
    max_upload: int = 10 << 20        # bytes of one uploaded image (larger: 413)
    page_size: int = 24               # results per page by default
    max_page: int = 100               # most results per page
    thumb: int = 192                  # thumbnail side in pixels
    queries_kept: int = 512           # recent queries remembered for paging and export
    thumbs_kept: int = 2048           # thumbnails kept in memory
    captioner: str | None = None      # captioner spec (None: "caption this" is unavailable); loaded by
                                      # create_app's ``load_captioner`` (search imports no other plugin)


class _LRU:
    def __init__(self, size: int):
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, k):
        with self.lock:
            v = self.d.get(k)
            if v is not None:
                self.d.move_to_end(k)
            return v

    def put(self, k, v):
        with self.lock:
            self.d[k] = v
            self.d.move_to_end(k)
            while len(self.d) > self.size:
                self.d.popitem(last=False)


class Api:
    """What the routes do, independent of Flask (one instance per app)."""

    def __init__(self, reader: IndexReader, scorer, cfg: ServeConfig, load_captioner: Callable | None = None):
        self.reader, self.scorer, self.cfg, self.load_captioner = reader, scorer, cfg, load_captioner
        self.queries = _LRU(cfg.queries_kept)
        self.thumbs = _LRU(cfg.thumbs_kept)
        self.model_lock = threading.Lock()
        self._captioner = None
        self._captioner_error: str | None = None

    # -- queries ----------------------------------------------------------------------------------
    def new_query(self, vec: np.ndarray, label: str, kind: str) -> str:
        qid = secrets.token_urlsafe(9)
        self.queries.put(qid, (vec, label, kind))
        return qid

    def text_query(self, text: str) -> str:
        from clipkit.core.backends import check_texts
        if self.scorer is None:
            raise InputError("this index has no CLIP recorded: search by an item instead")
        t = check_texts([text])[0]
        with self.model_lock:
            vec = self.scorer.encode_texts([t])[0].float().cpu().numpy()
        return self.new_query(vec, t, "text")

    def item_query(self, item_id: int) -> str:
        it = self.reader.item(item_id)
        return self.new_query(self.reader.vectors([it.id])[0], f"similar to #{it.id}", "item")

    def image_query(self, data: bytes, name: str) -> str:
        from clipkit.core.io import load_image_bytes
        if self.scorer is None:
            raise InputError("this index has no CLIP recorded: search by an item instead")
        im = load_image_bytes(data, name or "upload")
        with self.model_lock:
            vec = self.scorer.encode_images([im])[0].float().cpu().numpy()
        return self.new_query(vec, f"image {name or 'upload'}", "image")

    def page(self, qid: str, offset: int, limit: int) -> dict:
        q = self.queries.get(qid)
        if q is None:
            raise LookupError("unknown or expired query: search again")
        vec, label, kind = q
        t0 = time.perf_counter()
        hits = search_vectors(self.reader, vec, min(MAX_TOP, offset + limit))[offset:offset + limit]
        took = (time.perf_counter() - t0) * 1e3
        n = len(self.reader)
        return {"qid": qid, "query": label, "kind": kind, "offset": offset, "limit": limit,
                "indexed": n, "took_ms": round(took, 2),
                "has_more": len(hits) == limit and offset + limit < min(n, MAX_TOP),
                "results": [{**h.to_dict(), "thumb": f"/thumb/{h.id}", "image": f"/image/{h.id}"} for h in hits]}

    def export(self, qid: str, limit: int) -> dict:
        from clipkit.search.query import SearchResult
        q = self.queries.get(qid)
        if q is None:
            raise LookupError("unknown or expired query: search again")
        hits = search_vectors(self.reader, q[0], limit)
        return SearchResult(query=[q[1]], model=self.reader.model, results=hits, candidates=len(self.reader),
                            index=str(self.reader.path), structure=self.reader.manifest.ann.get("factory", ""),
                            nprobe=self.reader.nprobe).to_dict()

    # -- images -----------------------------------------------------------------------------------
    def thumb(self, item_id: int) -> bytes:
        b = self.thumbs.get(item_id)
        if b is None:
            im = self.reader.item_image(self.reader.item(item_id))
            im.thumbnail((self.cfg.thumb, self.cfg.thumb))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            b = buf.getvalue()
            self.thumbs.put(item_id, b)
        return b

    def image(self, item_id: int) -> tuple[bytes, str]:
        im = self.reader.item_image(self.reader.item(item_id))
        buf = io.BytesIO()
        if im.width * im.height <= 1 << 20:
            im.save(buf, "PNG")
            return buf.getvalue(), "image/png"
        im.save(buf, "JPEG", quality=92)
        return buf.getvalue(), "image/jpeg"

    # -- captions ---------------------------------------------------------------------------------
    def caption(self, item_id: int) -> dict:
        it = self.reader.item(item_id)
        im = self.reader.item_image(it)
        cap = self._load_captioner()
        with self.model_lock:
            res = cap.caption([im])[0]
        return {"id": it.id, "caption": res.caption, "clip_score": round(float(res.clip_score), 6)}

    def _load_captioner(self):
        if self.cfg.captioner is None:
            raise RuntimeError("no captioner configured (clipkit serve --captioner SPEC)")
        with self.model_lock:
            if self._captioner is None and self._captioner_error is None:
                try:
                    device = self.scorer.device if self.scorer is not None else "cpu"
                    self._captioner = self.load_captioner(self.cfg.captioner, device=device)
                except ClipkitError as e:
                    self._captioner_error = str(e)
            if self._captioner is None:
                raise RuntimeError(self._captioner_error)
            return self._captioner

    def info(self) -> dict:
        d = self.reader.info()
        return {"model": d["model"], "items": d["items"], "structure": d["structure"], "nprobe": d["nprobe"],
                "text_queries": self.scorer is not None, "captioner": self.cfg.captioner,
                "max_upload": self.cfg.max_upload, "page_size": self.cfg.page_size, "max_results": MAX_TOP}


def create_app(reader: IndexReader, scorer=None, config: ServeConfig | None = None,
               load_captioner: Callable | None = None):
    """The Flask app serving ``reader`` (``scorer``: the index's CLIP, for text and image queries).

    ``load_captioner(spec, device=...)`` loads ``config.captioner`` on the first "caption this" (the
    cli passes :func:`clipkit.captioning.captioner.load_captioner`)."""
    from flask import Flask, Response, jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException

    cfg = config or ServeConfig()
    if cfg.captioner is not None and load_captioner is None:
        raise InputError(f"captioner {cfg.captioner!r} given without load_captioner to load it")
    api = Api(reader, scorer, cfg, load_captioner)
    reader.ann_index()                              # assemble now: the first query is not the slow one
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_upload + (64 << 10)   # the image plus form overhead
    app.json.sort_keys = False
    app.extensions["clipkit_api"] = api

    def error(msg: str, code: int = 400):
        return jsonify({"error": msg}), code

    def int_arg(src, name: str, default: int, lo: int, hi: int) -> int:
        raw = src.get(name)
        if raw is None or raw == "":
            return default
        try:
            v = int(raw)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be an integer, got {raw!r}") from None
        if not lo <= v <= hi:
            raise InputError(f"{name} must be between {lo} and {hi}, got {v}")
        return v

    @app.errorhandler(HTTPException)
    def http_error(e):
        return error(e.description if e.code != 413 else
                     f"upload larger than {cfg.max_upload >> 20} MiB", e.code or 500)

    @app.errorhandler(ItemNotFound)
    def not_found(e):
        return error(str(e), 404)

    @app.errorhandler(ClipkitError)
    def clipkit_error(e):
        return error(str(e), 400)

    @app.errorhandler(LookupError)
    def lookup_error(e):
        return error(str(e.args[0]) if e.args else "not found", 404)

    @app.errorhandler(Exception)
    def unexpected(e):                                # never a traceback to the page; logged here
        log.exception("unexpected failure serving %s", request.path)
        return error(f"internal error: {type(e).__name__}", 500)

    @app.after_request
    def headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                "script-src 'self'; frame-ancestors 'none'")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        return resp

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<name>")
    def static_file(name):
        if name not in ("app.js", "style.css"):
            return error("not found", 404)
        return send_from_directory(STATIC, name, max_age=0)

    @app.get("/api/info")
    def info():
        return jsonify(api.info())

    @app.route("/api/search", methods=["GET", "POST"])
    def search():
        src = request.form if request.method == "POST" else request.args
        offset = int_arg(src, "offset", 0, 0, MAX_TOP - 1)
        limit = int_arg(src, "limit", cfg.page_size, 1, cfg.max_page)
        if offset + limit > MAX_TOP:
            raise InputError(f"offset + limit must be at most {MAX_TOP}")
        if request.method == "POST":
            f = request.files.get("image")
            if f is None:
                raise InputError("POST an image as the multipart field 'image'")
            data = f.stream.read(cfg.max_upload + 1)
            if len(data) > cfg.max_upload:
                return error(f"upload larger than {cfg.max_upload >> 20} MiB", 413)
            if not data:
                raise InputError("the uploaded file is empty")
            qid = api.image_query(data, Path(f.filename or "upload").name)
        else:
            kinds = [k for k in ("q", "id", "qid") if src.get(k) not in (None, "")]
            if len(kinds) != 1:
                raise InputError("give exactly one of q (text), id (an item) or qid (an earlier query)")
            if kinds[0] == "q":
                qid = api.text_query(src["q"])
            elif kinds[0] == "id":
                qid = api.item_query(int_arg(src, "id", 0, 0, 2 ** 62))
            else:
                qid = src["qid"]
        return jsonify(api.page(qid, offset, limit))

    @app.get("/api/export")
    def export():
        qid = request.args.get("qid", "")
        limit = int_arg(request.args, "limit", 100, 1, MAX_TOP)
        resp = jsonify(api.export(qid, limit))
        resp.headers["Content-Disposition"] = 'attachment; filename="clipkit-search.json"'
        return resp

    @app.post("/api/caption")
    def caption():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("id"), int) or isinstance(body.get("id"), bool):
            raise InputError('POST {"id": N} as JSON')
        try:
            return jsonify(api.caption(body["id"]))
        except RuntimeError as e:
            return error(f"captioning unavailable: {e}", 503)

    @app.get("/thumb/<int:item_id>")
    def thumb(item_id):
        return Response(api.thumb(item_id), mimetype="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.get("/image/<int:item_id>")
    def image(item_id):
        data, mime = api.image(item_id)
        return Response(data, mimetype=mime, headers={"Cache-Control": "private, max-age=300"})

    return app


def make_server(app, host: str = "127.0.0.1", port: int = 8000):
    """A threaded WSGI server (werkzeug) for ``app``; ``port=0`` picks a free port (``.server_port``)."""
    from werkzeug.serving import make_server as _make
    try:
        server = _make(host, port, app, threaded=True)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    # Request threads are joined by ``server_close`` rather than left as daemons: a daemon thread
    # still finishing a request when the interpreter exits is killed inside native code, and the
    # process aborts ("terminate called without an active exception") instead of exiting 0.
    server.daemon_threads = False
    server.block_on_close = True
    return server
