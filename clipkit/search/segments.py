"""The files of an index's segments and the writers' side of the folder: the fp16 embedding and
code files (:class:`NpyAppender` writes them, :func:`load_rows` maps them after checking header and
size, :func:`check_unit` refuses rows that are not unit vectors), the trained quantiser
(:func:`read_quantizer`), the writers' lock (:func:`locked`) and the clean-up of an interrupted
writer (:func:`recover`)."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sqlite3
import stat
from pathlib import Path
from typing import Iterator

import numpy as np

from clipkit.core.errors import ImageLoadError, InputError
from clipkit.search import ann
from clipkit.search.manifest import LOCK, REBUILD, Manifest
from clipkit.search.meta import meta_errors

_OURS = re.compile(r"^(emb-\d+\.npy|(codes|lists)-\d+-g\d+\.npy|ivf-g\d+\.faiss|\..*\.tmp.*)$")
UNIT_TOL = 0.02                  # |norm^2 - 1| of a stored fp16 unit vector is ~1e-3; garbage is far off


class NpyAppender:
    """Append rows to a ``.npy`` file of unknown final length: the header is written padded to a
    fixed size and rewritten with the row count at :meth:`close` (the file is then an ordinary .npy).
    ``sha256``: the digest of the data after the header, once closed."""

    HEADER = 128

    def __init__(self, path, dtype, width: int):
        self.path, self.dtype, self.width, self.rows = Path(path), np.dtype(dtype), width, 0
        self.f = open(self.path, "xb")
        self.f.write(self._header(0))
        self._h = hashlib.sha256()
        self.sha256 = ""

    def _header(self, rows: int) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": (rows, self.width)}
        body = repr(d).encode("latin1")
        pad = self.HEADER - 10 - len(body) - 1
        return b"\x93NUMPY\x01\x00" + (self.HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows of shape {rows.shape}, expected [*, {self.width}]")
        data = rows.tobytes()
        self.f.write(data)
        self._h.update(data)
        self.rows += len(rows)

    def close(self) -> int:
        self.f.seek(0)
        self.f.write(self._header(self.rows))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.sha256 = self._h.hexdigest()
        return self.rows


def load_rows(path, dtype=None, rows: int | None = None, width: int | None = None) -> np.ndarray:
    """A segment file, memory-mapped read-only, after checking that it is a regular file whose .npy
    header says a C-order 2-d array (of ``dtype``, ``rows`` x ``width`` when given) and whose size is
    exactly that. Anything else is an InputError naming the file."""
    from clipkit.core.io import open_regular
    fmt = np.lib.format
    try:
        fh = open_regular(path)
    except ImageLoadError as e:
        raise InputError(f"cannot read index file {path}: {e.reason}; {REBUILD}") from None

    def bad(why):
        return InputError(f"index file {path} is damaged ({why}); {REBUILD}")
    with fh:
        try:
            version = fmt.read_magic(fh)
            reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if reader is None:
                raise ValueError(f"npy format {version}")
            shape, fortran, dt = reader(fh)
            offset = fh.tell()
        except (ValueError, OSError, SyntaxError, EOFError, TypeError) as e:
            raise bad(f"not a .npy file: {e}") from None
        if len(shape) != 2 or fortran or dt.hasobject:
            raise bad(f"an array of shape {shape}")
        if dtype is not None and dt != np.dtype(dtype):
            raise bad(f"{dt} values, expected {np.dtype(dtype)}")
        if rows is not None and shape[0] != rows:
            raise bad(f"{shape[0]} rows, the manifest says {rows}")
        if width is not None and shape[1] != width:
            raise bad(f"rows of {shape[1]} values, expected {width}")
        need = offset + shape[0] * shape[1] * dt.itemsize
        size = os.fstat(fh.fileno()).st_size
        if size != need:
            raise bad(f"{size} bytes, its header says {need}: truncated or overwritten")
        if need == offset:
            return np.empty(shape, dt)
        return np.memmap(fh, dtype=dt, mode="r", offset=offset, shape=shape)


def file_sha256(arr: np.ndarray, chunk: int = 1 << 16) -> str:
    """sha256 of a loaded segment's data (what :class:`NpyAppender` records)."""
    h = hashlib.sha256()
    for a in range(0, len(arr), chunk):
        h.update(np.ascontiguousarray(arr[a:a + chunk]).tobytes())
    return h.hexdigest()


def check_unit(x: np.ndarray, path, first_row: np.ndarray | int = 0) -> np.ndarray:
    """Refuse stored rows that are not finite unit vectors (a damaged or foreign file): -> ``x``."""
    n = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    bad = ~(np.abs(n - 1) <= UNIT_TOL)
    if bad.any():
        j = int(np.argmax(bad))
        row = int(first_row[j]) if isinstance(first_row, np.ndarray) else first_row + j
        what = "not finite" if not np.isfinite(x[j]).all() else f"of norm {math.sqrt(n[j]):.4g}, not a unit vector"
        raise InputError(f"index file {path} is damaged (row {row} is {what}); {REBUILD}")
    return x


def read_quantizer(folder, m: Manifest):
    """The trained, empty FAISS structure of ``m``, checked against its recorded sha256."""
    from clipkit.core.io import open_regular
    p = Path(folder) / m.ann["quantizer"]
    try:
        with open_regular(p) as fh:
            data = fh.read()
    except ImageLoadError as e:
        raise InputError(f"cannot read index file {p}: {e.reason}; {REBUILD}") from None
    except OSError as e:
        raise InputError(f"cannot read index file {p}: {e.strerror or e}; {REBUILD}") from None
    want, digest = m.ann.get("quantizer_sha256"), hashlib.sha256(data).hexdigest()
    if want and digest != want:
        raise InputError(f"index file {p} is damaged (its sha256 differs from the manifest's); {REBUILD}")
    m.ann["quantizer_sha256"] = digest                  # format 1 recorded none: the next commit does
    try:
        index = ann.deserialize(data)
        ivf = ann.extract_ivf(index)
    except Exception as e:                          # FAISS: RuntimeError with a C++ message
        raise InputError(f"index file {p} is damaged (not a FAISS inverted file: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); {REBUILD}") from None
    if ivf.d != m.dim or ivf.nlist != m.ann["nlist"] or not index.is_trained:
        raise InputError(f"index file {p} is damaged (a {ivf.d}-d structure of {ivf.nlist} lists; the manifest "
                         f"says {m.dim}-d, {m.ann['nlist']} lists); {REBUILD}")
    return index


# ---- writers' lock and recovery -----------------------------------------------------------------

@contextlib.contextmanager
def locked(folder) -> Iterator[None]:
    """Exclusive writer lock (``flock`` on INDEX/.lock, never through a symlink, a regular file only)."""
    import fcntl
    p = Path(folder) / LOCK
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        raise InputError(f"cannot lock index {folder}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"cannot lock index {folder}: {p} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"index {folder} is being changed by another process; try again when it ends") from None
        yield
    finally:
        os.close(fd)


def recover(folder, m: Manifest, db: sqlite3.Connection) -> None:
    """Undo what an interrupted writer left beyond generation ``m.generation``: metadata rows and
    files that no manifest references."""
    g = m.generation
    with meta_errors(folder), db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM items WHERE added > ?", (g,))
        db.execute("UPDATE items SET removed = NULL WHERE removed > ?", (g,))
        db.execute("DELETE FROM skipped WHERE gen > ?", (g,))
        db.execute("DELETE FROM generations WHERE gen > ?", (g,))
    keep = {s.emb for s in m.segments} | {s.codes for s in m.segments} | {m.ann.get("quantizer")}
    for name in os.listdir(folder):
        if _OURS.match(name) and name not in keep:
            with contextlib.suppress(OSError):
                os.unlink(Path(folder) / name)
