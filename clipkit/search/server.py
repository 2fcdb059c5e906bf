"""The local web page of ``clipkit serve``: the Flask app over one opened index, whose search routes the
studio (:mod:`clipkit.studio`) shares.

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

What every app does besides its routes (the ``Host`` and ``Origin`` checks, upload limits, the
decoding budget, JSON errors) and the server are :mod:`clipkit.search.web`.
"""
from __future__ import annotations

import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from clipkit.core.errors import ClipkitError, InputError
from clipkit.search.query import MAX_TOP, search_vectors
from clipkit.search.store import IndexReader, ItemNotFound
from clipkit.search.web import PixelBudget, ServeConfig, decode_image, install_web, int_arg, read_upload

MAX_ID = 2 ** 62                   # item ids beyond this are no item (and would overflow SQLite)


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
