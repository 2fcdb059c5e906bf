"""The web plumbing every page app here shares (the search page, :mod:`clipkit.search.server`, and the
studio, :mod:`clipkit.studio`): the server's settings (:class:`ServeConfig`), JSON errors, the
security guards and upload limits (:func:`install_web`), and the threaded server (:func:`make_server`).

What every app does (:func:`install_web`): the ``Host`` header must name the bound address or
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
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from clipkit.core.errors import ClipkitError, InputError
from clipkit.search.store import ItemNotFound

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = ("app.js", "studio.js", "style.css")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
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
