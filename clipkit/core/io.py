"""Robust image loading: every file Pillow can read becomes an RGB ``PIL.Image`` or a typed error.

Handles EXIF orientation, CMYK, palette (with transparency), 16-bit and float greyscale,
LA/RGBA (composited on a fixed background), and guards against decompression bombs.
A truncated, empty or non-image file raises :class:`ImageLoadError` with the path and reason.
"""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipkit.core.errors import ImageLoadError

try:  # optional HEIC/HEIF support
    from pillow_heif import register_heif_opener
    register_heif_opener()
except ImportError:
    pass

ImageLike = Union[str, os.PathLike, Image.Image]

#: Default decompression-bomb guard (pixels). Pillow's own default warns at ~89M and fails at 2x.
DEFAULT_MAX_PIXELS = 89_478_485
#: Default time bound (seconds) on decoding one file: a pathological file never hangs a run.
DEFAULT_TIMEOUT_S = 30.0
#: Background used when compositing transparent images (white, like a browser or a printed page).
DEFAULT_BACKGROUND = (255, 255, 255)

IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items()
    if fmt in Image.OPEN
)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        return _to_rgb(im, background)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float greyscale: Pillow's convert("RGB") clips at 255, so rescale.
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            top = 65535.0
        else:
            top = 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV ...


class DecodeTimeout(Exception):
    """Raised inside :func:`time_bound` when the time is up."""


def _alarm(signum, frame):
    raise DecodeTimeout()


@contextlib.contextmanager
def time_bound(seconds: float | None):
    """Bound the time of the block with a SIGALRM timer (in the main thread of a process; elsewhere,
    e.g. a web server's worker thread, the block runs unbounded and callers rely on the file checks)."""
    use = bool(seconds) and threading.current_thread() is threading.main_thread()
    if use:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def open_regular(path, mode: str = "rb"):
    """Open a file for reading only if it is a regular file (a FIFO, socket or device would block or
    never end). Opened non-blocking, then checked with ``fstat`` on the open descriptor (no race)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied", permanent=False) from None
    except OSError as e:
        raise ImageLoadError(path, e.strerror or str(e), permanent=False) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise ImageLoadError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageLoadError(path, "not a regular file", permanent=False)
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def load_image(
    source: ImageLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> Image.Image:
    """Open ``source`` (a path or a PIL image) as a fully decoded RGB image.

    Only regular files are opened, and decoding is time-bound (``timeout_s``). Raises
    :class:`ImageLoadError` naming the path and the reason for any file that cannot be read; its
    ``permanent`` flag says whether the reason is a property of the file's bytes (worth remembering)
    or of the moment (a timeout, a permission: retried next time).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source) or source, background)
    path = Path(source)
    with open_regular(path) as fh:
        return _decode(fh, path, max_pixels, background, timeout_s,
                       size=lambda: path.stat().st_size if path.exists() else 0)


def load_image_bytes(
    data: bytes,
    name: str = "<bytes>",
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> Image.Image:
    """Like :func:`load_image` for bytes already in memory (an upload, a member of a tar shard);
    ``name`` stands for the path in errors. The same guards: decompression bombs, time bound."""
    import io
    return _decode(io.BytesIO(bytes(data)), name, max_pixels, background, timeout_s, size=lambda: len(data))


def _decode(fh, path, max_pixels, background, timeout_s, size) -> Image.Image:
    """Decode an open binary file object fully into RGB, or raise :class:`ImageLoadError`."""
    try:
        with time_bound(timeout_s), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageLoadError(
                        path, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb; raise max_pixels if you trust the file)",
                        permanent=False)
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return _to_rgb(im, background)
    except ImageLoadError:
        raise
    except DecodeTimeout:
        raise ImageLoadError(path, f"decoding took longer than {timeout_s:g}s", permanent=False) from None
    except UnidentifiedImageError:
        reason = "empty file" if size() == 0 else "not an image Pillow can identify"
        raise ImageLoadError(path, reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"decompression bomb guard: {e}", permanent=False) from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied", permanent=False) from None
    except MemoryError:
        raise ImageLoadError(path, "out of memory while decoding", permanent=False) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(path, f"corrupt or truncated ({e})") from None


def read_text_file(path, what: str = "file", max_bytes: int = 64 << 20) -> str:
    """A small UTF-8 text input (texts, templates, references, configs): regular files only, bounded
    size; every failure is an :class:`InputError` naming the file."""
    from clipkit.core.errors import InputError
    try:
        with open_regular(path) as fh:
            data = fh.read(max_bytes + 1)
    except ImageLoadError as e:
        raise InputError(f"cannot read {what} {path}: {e.reason}") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise InputError(f"{what} {path} is larger than {max_bytes >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"cannot read {what} {path}: not UTF-8 text (byte {e.start})") from None


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def scan_images(paths, recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image paths.

    Folders are walked recursively (``recursive=True``); symlinked folders are followed once
    (a loop, or a second name for a folder already walked, is detected by real path and not
    re-entered, across all of ``paths``). A file is listed once by its real path, under the first
    name it is met by (an alias folder or link never indexes the same file twice). Files named
    explicitly are kept whatever their extension, so a bad file is reported later instead of
    silently dropped.
    """
    out: list[Path] = []
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()

    def first(fp: Path, real_parent: str | None = None) -> bool:
        # in a walked folder (real path known) only a linked file needs resolving
        real = os.path.join(real_parent, fp.name) if real_parent is not None and not os.path.islink(fp) \
            else os.path.realpath(fp)
        if real in seen_files:
            return False
        seen_files.add(real)
        return True
    for p in map(Path, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=True):
                real = os.path.realpath(root)
                if real in seen_dirs:
                    dirs[:] = []
                    continue
                seen_dirs.add(real)
                dirs.sort()
                if not recursive:
                    dirs[:] = []
                for f in sorted(files):
                    fp = Path(root) / f
                    if is_image_path(fp) and first(fp, real):
                        out.append(fp)
        elif first(p):
            out.append(p)
    return out
