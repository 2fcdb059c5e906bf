"""The local web page of ``clipkit serve``: the Flask app over one opened index, and the web plumbing the
studio (:mod:`clipkit.studio`) shares with it.

Routes of the search page (JSON errors ``{"error": ...}`` with a 4xx status; the server keeps serving
after any of them):

* ``GET  /``                      the page (plain HTML + JS, no build step; the studio's tabs, of which
                                  this app offers the search tab only)
* ``GET  /api/info``              model, items, structure, whether captioning is available
* ``GET  /api/search?q=TEXT``     text query; ``?id=N`` the item N as the query; ``?qid=T`` a page of an
                                  earlier query; each with ``offset`` and ``limit`` (paging)
* ``POST /api/search``            multipart ``image``: an uploaded image as the query (bounded in bytes and
                                  pixels, decoded under the pixel budget)
* ``GET  /api/export?qid=T``      a result set as a JSON download (``limit``, default 100)
* ``POST /api/caption``           ``{"id": N}`` -> a caption of item N by the captioner
* ``GET  /thumb/N``, ``/image/N`` the image of item N (a thumbnail / the picture, re-encoded, at most
                                  ``ServeConfig.max_side`` pixels a side)

Files are served by item id only, never by a path from the request, and only while they are the
file that was indexed (same real path, a regular file, same size and mtime): no path traversal,
no symlink planted after indexing is followed elsewhere. Paths in the JSON are relative to the
indexed sources where possible (``photos/a.png``, ``shard-000.tar#key``).

What every app here does (:func:`install_web`): the ``Host`` header must name the bound address or
a local name (DNS rebinding: 421); a state-changing request (any method but GET/HEAD/OPTIONS) whose
``Origin`` is not the server's own, and any request a browser marks ``Sec-Fetch-Site: cross-site``
(but a top-level visit of the page), is refused (403); uploads are bounded in bytes (413) and pixels
(413), and decoding is bounded across concurrent requests by a pixel budget (:class:`PixelBudget`:
a request waits while others decode, so eight huge uploads at once decode one after the other) and
downscaled before anything holds a full-size copy (JPEG ``draft``, ``thumbnail`` in place).
"""
from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from clipkit.core.errors import ClipkitError, InputError
from clipkit.search.query import MAX_TOP, search_vectors
from clipkit.search.store import IndexReader, ItemNotFound

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = ("app.js", "studio.js", "style.css")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MAX_ID = 2 ** 62                   # item ids beyond this are no item (and would overflow SQLite)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class ServeConfig:
    """Settings of the page's server (shown by /api/info)."""
    max_upload: int = 10 << 20        # bytes of one uploaded image (larger: 413)
    max_request: int | None = None    # bytes of one request (None: 4 uploads' worth)
    max_pixels: int = 89_478_485      # pixels of one uploaded image (larger: 413; Pillow's bomb guard)
    decode_budget: int = 100_000_000  # pixels decoded at once across all requests (a request waits)
    decode_wait_s: float = 120.0      # how long a request waits for the budget before a 503
    max_side: int = 1024              # uploads are downscaled to at most this many pixels a side
    page_size: int = 24               # results per page by default
    max_page: int = 100               # most results per page
    thumb: int = 192                  # thumbnail side in pixels
    queries_kept: int = 512           # recent queries remembered for paging and export
    thumbs_kept: int = 2048           # thumbnails kept in memory
    captioner: str | None = None      # captioner spec (None: "caption this" is unavailable); loaded by
                                      # create_app's ``load_captioner`` (search imports no other plugin)
    allowed_hosts: tuple = ()         # Host names accepted besides the local ones and the bound address

    @property
    def request_limit(self) -> int:
        return (self.max_request or 4 * self.max_upload) + (64 << 10)   # plus form overhead


class HttpError(Exception):
    """An error answered as ``{"error": message}`` with ``code`` (a 4xx or 503)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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


# -- uploads: bounded bytes, pixels and decoding ---------------------------------------------------

class PixelBudget:
    """At most ``total`` pixels being decoded at once across threads: :meth:`hold` waits (up to
    ``timeout``) until its share is free. A request larger than the whole budget holds all of it."""

    def __init__(self, total: int):
        self.total, self.used, self.cond = max(1, int(total)), 0, threading.Condition()
        self.peak = 0

    @contextlib.contextmanager
    def hold(self, pixels: int, timeout: float):
        n = min(max(1, int(pixels)), self.total)
        with self.cond:
            if not self.cond.wait_for(lambda: self.used + n <= self.total, timeout):
                raise HttpError(503, "the server is busy decoding other images: try again")
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


def decode_image(data: bytes, name: str, budget: PixelBudget, *, max_side: int = 1024,
                 max_pixels: int = 89_478_485, wait_s: float = 120.0):
    """Decode image bytes into an RGB ``PIL.Image`` of at most ``max_side`` pixels a side, or raise
    :class:`HttpError` (400: not an image or corrupt; 413: more than ``max_pixels`` pixels).

    The size is read from the header first; JPEGs decode at a reduced scale (``draft``), others are
    downscaled in place right after decoding, under ``budget`` (so concurrent requests never hold
    more than the budget's pixels at full size), then converted to RGB by the robust loader
    (:func:`clipkit.core.io.load_image`: palette, 16-bit, alpha, CMYK; EXIF orientation)."""
    from PIL import Image, UnidentifiedImageError

    from clipkit.core.errors import ImageLoadError
    from clipkit.core.io import load_image
    if not data:
        raise HttpError(400, f"{name}: the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise HttpError(413, f"{name}: {w}x{h} = {w * h} pixels is more than the limit of {max_pixels} "
                                     "(possible decompression bomb)")
            if w < 1 or h < 1:
                raise HttpError(400, f"{name}: an image of {w}x{h} pixels")
            if im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))        # decode at 1/2, 1/4 or 1/8 scale
            with budget.hold(im.size[0] * im.size[1], wait_s):
                im.load()
                if max(im.size) > max_side:
                    try:
                        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)   # in place
                    except (ValueError, OSError):            # a mode resize does not take: RGB first
                        im = load_image(im)
                        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                return load_image(im)                        # RGB, EXIF orientation applied
    except HttpError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise HttpError(413, f"{name}: decompression bomb guard: {e}") from None
    except UnidentifiedImageError:
        raise HttpError(400, f"{name}: not an image Pillow can identify") from None
    except ImageLoadError as e:
        raise HttpError(400, f"{name}: {e.reason}") from None
    except MemoryError:
        raise HttpError(413, f"{name}: out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as e:
        raise HttpError(400, f"{name}: corrupt or truncated image ({e})") from None


def read_upload(storage, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, base name) of an uploaded file (werkzeug ``FileStorage``), at most ``max_bytes`` (413)."""
    name = Path(storage.filename or "upload").name[:200] or "upload"
    data = storage.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HttpError(413, f"{name}: upload larger than {max_bytes / (1 << 20):g} MiB")
    if not data:
        raise HttpError(400, f"{name}: the uploaded file is empty")
    return data, name


# -- host and origin checks ------------------------------------------------------------------------

def _host_name(host: str) -> str:
    host = (host or "").strip().lower()
    if host.startswith("["):                                 # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(host_header: str, bound: str, extra=()) -> bool:
    """Whether a request's ``Host`` names this server: a local name, the bound address, one of
    ``extra``; bound to every interface (0.0.0.0, ::), also any IP address and this machine's names.
    A DNS-rebinding page reaches the server under its own domain name, which is none of these."""
    name = _host_name(host_header)
    if not name:
        return False
    if name in LOCAL_HOSTS or name.endswith(".localhost") or name == bound.lower():
        return True
    if name in {h.lower() for h in extra}:
        return True
    if _is_ip(name) and ipaddress.ip_address(name).is_loopback:
        return True
    if bound in WILDCARD_HOSTS:
        if _is_ip(name):
            return True
        with contextlib.suppress(OSError):
            return name in {socket.gethostname().lower(), socket.getfqdn().lower()}
    return False


def install_web(app, cfg: ServeConfig) -> None:
    """What every page app here shares: upload limits, JSON errors (never a traceback), security
    headers, the Host (DNS rebinding) and Origin (cross-site requests) checks, the page and its
    static files."""
    from flask import jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException

    app.config["MAX_CONTENT_LENGTH"] = cfg.request_limit
    app.config.setdefault("CLIPKIT_BIND", "127.0.0.1")
    app.json.sort_keys = False

    def error(msg: str, code: int = 400):
        return jsonify({"error": msg}), code

    @app.before_request
    def guard():
        if not host_allowed(request.host, app.config["CLIPKIT_BIND"], cfg.allowed_hosts):
            return error(f"unexpected Host header {request.host[:100]!r}: this server answers to "
                         f"localhost or its own address only (DNS rebinding guard)", 421)
        site = request.headers.get("Sec-Fetch-Site", "")
        if site == "cross-site" and not (request.method == "GET" and request.path == "/"
                                         and request.headers.get("Sec-Fetch-Mode") == "navigate"):
            return error("cross-site request refused", 403)
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin is not None:
                parts = urlsplit(origin)
                if origin == "null" or parts.scheme not in ("http", "https") \
                        or parts.netloc.lower() != request.host.lower():
                    return error(f"cross-origin request from {origin[:100]!r} refused", 403)
            if site not in ("", "same-origin", "none"):
                return error("cross-origin request refused", 403)
        return None

    @app.errorhandler(HTTPException)
    def http_error(e):
        return error(e.description if e.code != 413 else
                     f"request larger than {cfg.request_limit / (1 << 20):.0f} MiB", e.code or 500)

    @app.errorhandler(HttpError)
    def api_error(e):
        return error(e.message, e.code)

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
        resp.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        return resp

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "index.html", max_age=0)

    @app.get("/static/<name>")
    def static_file(name):
        if name not in STATIC_FILES:
            return error("not found", 404)
        return send_from_directory(STATIC, name, max_age=0)


def int_arg(src, name: str, default: int, lo: int, hi: int) -> int:
    """An integer request argument in [lo, hi] (an InputError: 400)."""
    raw = src.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {str(raw)[:40]!r}") from None
    if not lo <= v <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {v}")
    return v


# -- the search API ---------------------------------------------------------------------------------

class Api:
    """What the search routes do, independent of Flask (one instance per app).

    ``run(fn)`` runs a model-heavy call (a caption): by default here, under the model lock; the
    studio passes its job queue's, so that it waits its turn behind generations."""

    def __init__(self, reader: IndexReader, scorer, cfg: ServeConfig, load_captioner: Callable | None = None,
                 budget: PixelBudget | None = None, run: Callable | None = None):
        self.reader, self.scorer, self.cfg, self.load_captioner = reader, scorer, cfg, load_captioner
        self.queries = _LRU(cfg.queries_kept)
        self.thumbs = _LRU(cfg.thumbs_kept)
        self.model_lock = threading.RLock()
        self.budget = budget or PixelBudget(cfg.decode_budget)
        self.run = run or self._run_here
        self._captioner = None
        self._captioner_error: str | None = None
        self.roots = sorted({os.path.dirname(os.path.abspath(s)) for s in reader.manifest.sources},
                            key=len, reverse=True)

    def _run_here(self, fn):
        with self.model_lock:
            return fn()

    def display_path(self, path: str) -> str:
        """``path`` relative to the folder holding the indexed source it comes from (a folder source
        keeps its own name: ``photos/a.png``), else as recorded."""
        for root in self.roots:
            if root and path.startswith(root.rstrip(os.sep) + os.sep):
                return path[len(root.rstrip(os.sep)) + 1:]
        return path

    def decode(self, data: bytes, name: str, max_side: int | None = None):
        return decode_image(data, name, self.budget, max_side=max_side or self.cfg.max_side,
                            max_pixels=self.cfg.max_pixels, wait_s=self.cfg.decode_wait_s)

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

    def item(self, item_id: int):
        if not isinstance(item_id, (int, np.integer)) or not 0 <= item_id < MAX_ID:
            raise ItemNotFound(f"no item with id {item_id} in the index")
        return self.reader.item(int(item_id))

    def item_query(self, item_id: int) -> str:
        it = self.item(item_id)
        return self.new_query(self.reader.vectors([it.id])[0], f"similar to #{it.id}", "item")

    def image_query(self, data: bytes, name: str) -> str:
        if self.scorer is None:
            raise InputError("this index has no CLIP recorded: search by an item instead")
        im = self.decode(data, name or "upload")
        with self.model_lock:
            vec = self.scorer.encode_images([im])[0].float().cpu().numpy()
        return self.new_query(vec, f"image {name or 'upload'}", "image")

    def hit_dict(self, h) -> dict:
        d = h.to_dict()
        d["path"] = self.display_path(d["path"])
        return {**d, "thumb": f"/thumb/{h.id}", "image": f"/image/{h.id}"}

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
                "results": [self.hit_dict(h) for h in hits]}

    def export(self, qid: str, limit: int) -> dict:
        from clipkit.search.query import SearchResult
        q = self.queries.get(qid)
        if q is None:
            raise LookupError("unknown or expired query: search again")
        hits = search_vectors(self.reader, q[0], limit)
        for h in hits:
            h.path = self.display_path(h.path)
        return SearchResult(query=[q[1]], model=self.reader.model, results=hits, candidates=len(self.reader),
                            index=Path(self.reader.path).name, structure=self.reader.manifest.ann.get("factory", ""),
                            nprobe=self.reader.nprobe).to_dict()

    # -- images -----------------------------------------------------------------------------------
    def current(self, item_id: int):
        """The item, checked against its file now (a changed file is no item: 404): -> (item, key)."""
        it = self.item(item_id)
        if not it.real:
            raise ItemNotFound(f"item {it.id} has no image (the index holds bare vectors)")
        try:
            st = os.stat(it.real)
        except OSError:
            raise ItemNotFound(f"cannot read {self.display_path(it.path)}: no such file") from None
        if (st.st_size, st.st_mtime_ns) != (it.size, it.mtime) or \
                os.path.realpath(it.shard or it.path) != it.real:
            raise ItemNotFound(f"{self.display_path(it.path)} changed since it was indexed (run `clipkit index add`)")
        return it, (it.id, it.real, st.st_size, st.st_mtime_ns)

    def thumb(self, item_id: int) -> bytes:
        it, key = self.current(item_id)
        b = self.thumbs.get(key)                 # keyed by the file's size and mtime: never stale
        if b is None:
            im = self.decode(self.reader.item_bytes(it), self.display_path(it.path), max_side=self.cfg.thumb)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            b = buf.getvalue()
            self.thumbs.put(key, b)
        return b

    def image(self, item_id: int) -> tuple[bytes, str]:
        it, _ = self.current(item_id)
        im = self.decode(self.reader.item_bytes(it), self.display_path(it.path), max_side=max(self.cfg.max_side, 2048))
        buf = io.BytesIO()
        if im.width * im.height <= 1 << 20:
            im.save(buf, "PNG")
            return buf.getvalue(), "image/png"
        im.save(buf, "JPEG", quality=92)
        return buf.getvalue(), "image/jpeg"

    # -- captions ---------------------------------------------------------------------------------
    def caption(self, item_id: int) -> dict:
        it = self.item(item_id)
        data = self.reader.item_bytes(it)                # a changed or missing file: 404 first
        if self.cfg.captioner is None:
            raise RuntimeError("no captioner configured (clipkit serve --captioner SPEC)")
        im = self.decode(data, self.display_path(it.path))

        def work(*_):
            cap = self._load_captioner()
            return cap.caption([im])[0]
        res = self.run(work)
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
                "index": Path(d["index"]).name, "text_queries": self.scorer is not None,
                "captioner": self.cfg.captioner, "max_upload": self.cfg.max_upload, "page_size": self.cfg.page_size,
                "max_results": MAX_TOP}


def register_search(app, api: Api) -> None:
    """The search routes over ``api`` (see the module's docstring)."""
    from flask import Response, jsonify, request

    cfg = api.cfg

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
            data, name = read_upload(f, cfg.max_upload)
            qid = api.image_query(data, name)
        else:
            kinds = [k for k in ("q", "id", "qid") if src.get(k) not in (None, "")]
            if len(kinds) != 1:
                raise InputError("give exactly one of q (text), id (an item) or qid (an earlier query)")
            if kinds[0] == "q":
                qid = api.text_query(src["q"])
            elif kinds[0] == "id":
                qid = api.item_query(int_arg(src, "id", 0, 0, MAX_ID - 1))
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
            return jsonify({"error": f"captioning unavailable: {e}"}), 503

    @app.get("/thumb/<int:item_id>")
    def thumb(item_id):
        return Response(api.thumb(item_id), mimetype="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/image/<int:item_id>")
    def image(item_id):
        data, mime = api.image(item_id)
        return Response(data, mimetype=mime, headers={"Cache-Control": "no-cache"})


def create_app(reader: IndexReader, scorer=None, config: ServeConfig | None = None,
               load_captioner: Callable | None = None):
    """The Flask app serving ``reader`` (``scorer``: the index's CLIP, for text and image queries).

    ``load_captioner(spec, device=...)`` loads ``config.captioner`` on the first "caption this" (the
    cli passes :func:`clipkit.captioning.captioner.load_captioner`). ``clipkit serve`` itself serves the
    studio (:mod:`clipkit.studio`), whose search tab is these routes."""
    from flask import Flask, jsonify

    cfg = config or ServeConfig()
    if cfg.captioner is not None and load_captioner is None:
        raise InputError(f"captioner {cfg.captioner!r} given without load_captioner to load it")
    api = Api(reader, scorer, cfg, load_captioner)
    reader.ann_index()                              # assemble now: the first query is not the slow one
    app = Flask(__name__, static_folder=None)
    app.extensions["clipkit_api"] = api
    install_web(app, cfg)
    register_search(app, api)

    @app.get("/api/info")
    def info():
        return jsonify({**api.info(), "tabs": ["search"]})

    return app


def make_server(app, host: str = "127.0.0.1", port: int = 8000):
    """A threaded WSGI server (werkzeug) for ``app``; ``port=0`` picks a free port (``.server_port``).

    A port in use, or an address that cannot be bound, is an :class:`InputError` of one line (werkzeug
    would print its own lines and exit 1). The app learns the bound address (its Host check)."""
    from werkzeug.serving import get_sockaddr, select_address_family
    from werkzeug.serving import make_server as _make
    fam = select_address_family(host, port)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(get_sockaddr(host, int(port), fam))
        sock.listen(128)
    except OSError as e:
        sock.close()
        import errno
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} is in use on {host} (another server?): choose another --port, "
                             "or --port 0 for any free one") from None
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    try:
        server = _make(host, port, app, threaded=True, fd=sock.fileno())
    finally:
        sock.close()                                   # the server holds its own duplicate
    server.server_port = server.port
    if hasattr(app, "config"):
        app.config["CLIPKIT_BIND"] = host
    # Request threads are joined by ``server_close`` rather than left as daemons: a daemon thread
    # still finishing a request when the interpreter exits is killed inside native code, and the
    # process aborts ("terminate called without an active exception") instead of exiting 0.
    server.daemon_threads = False
    server.block_on_close = True
    return server
