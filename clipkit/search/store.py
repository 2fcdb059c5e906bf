"""The index on disk, and reading it.

An index is a folder::

    INDEX/manifest.json          the commit point: index id, generation, model (spec, weights digest,
                                 preprocessing), segments (rows, file digests), the ANN plan (codec,
                                 nlist, tuned nprobe), the typed configs
    INDEX/emb-000001.npy         L2-normalised fp16 embeddings [rows, D] of one segment (memory-mapped):
                                 the one copy of the vectors (exact re-scoring reads it; with the
                                 SQfp16 codec it is also the body of every FAISS code)
    INDEX/lists-000001-g1.npy    the segment's inverted-list numbers [rows, ccs] uint8 under the
                                 quantiser of gen 1 (SQfp16: the code is list number + the fp16 row)
    INDEX/codes-000001-g1.npy    instead of lists-*, for SQ8/PQ codecs (and indexes of format 1): the
                                 FAISS standalone codes [rows, C] uint8 (list number + code)
    INDEX/ivf-g1.faiss           the trained, empty FAISS structure (coarse centroids, codec tables)
    INDEX/meta.sqlite            items(id, path, real, size, mtime, caption, shard, member, added, removed),
                                 generations(gen, index_id, rows, alive, dim)

Ids are row numbers across the segments and never change. An item is visible at generation G when
``added <= G`` and it was not ``removed`` at or before G, so a writer (``index add``) prepares a new
segment, new codes and new metadata rows tagged G+1 while readers keep using G, and commits by
replacing ``manifest.json`` atomically; files and rows of an uncommitted generation are cleaned up
by the next writer (:func:`recover`). Writers take an exclusive lock on ``INDEX/.lock``.

The pieces are checked against each other on open (:class:`IndexReader`): the manifest's fields
(types, ranges, file names), the ``generations`` row of its generation in meta.sqlite (the same
index id, rows, alive items, dimension), every segment file's header and size, the quantiser's
sha256 when it is read; every stored row read is checked to be a finite unit vector. ``index info
--verify`` reads every file against its sha256. Only regular files are opened (a FIFO never hangs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clipkit.core.errors import ImageLoadError, InputError, ModelLoadError
from clipkit.search import ann

log = logging.getLogger(__name__)

FORMAT = "clipkit-index"
VERSION = 2                      # 2: index identity, lists-* files (one copy of the vectors); 1 still opens
MANIFEST = "manifest.json"
META = "meta.sqlite"
LOCK = ".lock"
EMB_NAME = re.compile(r"^emb-\d{6}\.npy$")
CODES_NAME = re.compile(r"^(codes|lists)-\d{6}-g\d+\.npy$")
IVF_NAME = re.compile(r"^ivf-g\d+\.faiss$")
_OURS = re.compile(r"^(emb-\d+\.npy|(codes|lists)-\d+-g\d+\.npy|ivf-g\d+\.faiss|\..*\.tmp.*)$")
MAX_DIM = 1 << 16
UNIT_TOL = 0.02                  # |norm^2 - 1| of a stored fp16 unit vector is ~1e-3; garbage is far off
REBUILD = "rebuild the index (clipkit index build ... --overwrite)"


class ItemNotFound(InputError):
    """No such visible item, or its image is no longer the file that was indexed."""


@dataclass
class Segment:
    emb: str            # fp16 [rows, D] .npy
    codes: str          # lists-*.npy: list numbers [rows, ccs] (the code body is the fp16 row), or
                        # codes-*.npy: FAISS standalone codes [rows, C] uint8, under the current quantiser
    start: int          # first id
    rows: int
    emb_sha256: str = ""     # sha256 of the data after the .npy header ("" in format 1)
    codes_sha256: str = ""

    @property
    def lists_only(self) -> bool:
        return self.codes.startswith("lists-")


@dataclass
class Manifest:
    model: str                        # CLIP spec the embeddings come from (a local directory: absolute)
    preprocess: dict                  # its preprocessing (PreprocessConfig.to_dict())
    dim: int
    ann: dict                         # AnnPlan.to_dict() + quantizer(+_sha256), nprobe, recall, tuned_n, trained_generation
    config: dict                      # AnnConfig (asdict)
    segments: list[Segment] = field(default_factory=list)
    generation: int = 1
    rows: int = 0                     # ids handed out so far (alive + removed)
    alive: int = 0                    # searchable items
    sources: list[str] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    index_id: str = ""                # random id, also in meta.sqlite's generations table ("" in format 1)
    weights: str = ""                 # sha256 of the CLIP's weights as loaded at `precision` ("": unknown)
    precision: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["segments"] = [Segment(**{k: v for k, v in s.items() if k in Segment.__dataclass_fields__})
                         for s in d.get("segments", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Item:
    id: int
    path: str                   # display path (absolute; SHARD#MEMBER for a shard member)
    real: str                   # real path of the file (the shard for a member); "" for bare vectors
    size: int                   # bytes of the file (of the shard for a member)
    mtime: int                  # mtime in ns (of the shard)
    caption: str | None = None
    shard: str | None = None
    member: str | None = None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _canon(d) -> str:
    return json.dumps(d, sort_keys=True)


def read_manifest(path) -> Manifest:
    """The manifest of the index folder ``path``, every field checked (types, ranges, file names, the
    segments adding up); anything else is an InputError naming the file."""
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir():
        raise InputError(f"{p} is not an index folder (build one with `clipkit index build`)")
    if not os.path.lexists(mf):
        raise InputError(f"{p} is not a clipkit index (no {MANIFEST}; build one with `clipkit index build`)")
    from clipkit.core.io import read_text_file
    try:
        d = json.loads(read_text_file(mf, "index manifest"))
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{mf} is damaged ({e}); {REBUILD}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(f"{mf} is not a clipkit index manifest")
    v = d.get("version")
    if not _is_int(v) or v < 1:
        raise InputError(f"{mf} is damaged (version {v!r}); {REBUILD}")
    if v > VERSION:
        raise InputError(f"{p} was written by a newer clipkit (index format {v}); upgrade clipkit")
    try:
        m = Manifest.from_dict(d)
    except (TypeError, AttributeError) as e:
        raise InputError(f"{mf} is damaged ({e}); {REBUILD}") from None
    why = _manifest_problem(m)
    if why:
        raise InputError(f"{mf} is damaged ({why}); {REBUILD}")
    return m


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _manifest_problem(m: Manifest) -> str | None:
    """What is wrong with a parsed manifest (None: nothing)."""
    if not isinstance(m.model, str) or not m.model.strip():
        return f"model {m.model!r} is not a model spec"
    if not isinstance(m.preprocess, dict):
        return "preprocess is not an object"
    if not _is_int(m.dim) or not 1 <= m.dim <= MAX_DIM:
        return f"dim {m.dim!r} is not an integer in 1..{MAX_DIM}"
    if not _is_int(m.generation) or m.generation < 1:
        return f"generation {m.generation!r} is not a positive integer"
    if not _is_int(m.rows) or m.rows < 1:
        return f"rows {m.rows!r} is not a positive integer"
    if not _is_int(m.alive) or not 0 <= m.alive <= m.rows:
        return f"alive {m.alive!r} is not an integer in 0..rows"
    if not isinstance(m.sources, list) or not all(isinstance(x, str) for x in m.sources):
        return "sources is not a list of paths"
    for k in ("created", "updated", "index_id", "weights", "precision"):
        if not isinstance(getattr(m, k), str):
            return f"{k} is not a string"
    if m.version >= 2 and not re.fullmatch(r"[0-9a-f]{32}", m.index_id):
        return f"index_id {m.index_id!r} is not an index id"
    if not isinstance(m.segments, list) or not m.segments:
        return "no segments"
    total = 0
    for s in m.segments:
        if not isinstance(s.emb, str) or not EMB_NAME.match(s.emb):
            return f"segment file name {s.emb!r}"
        if not isinstance(s.codes, str) or not CODES_NAME.match(s.codes):
            return f"codes file name {s.codes!r}"
        if not _is_int(s.start) or s.start != total:
            return f"segment {s.emb} starts at {s.start!r}, not {total}"
        if not _is_int(s.rows) or s.rows < 1:
            return f"segment {s.emb} has {s.rows!r} rows"
        if not isinstance(s.emb_sha256, str) or not isinstance(s.codes_sha256, str):
            return f"segment {s.emb} digests are not strings"
        total += s.rows
    if total != m.rows:
        return f"rows {m.rows} but the segments hold {total}"
    a = m.ann
    if not isinstance(a, dict):
        return "ann is not an object"
    for k in ("nlist", "dim", "n", "code_bytes", "memory", "nprobe"):
        if not _is_int(a.get(k)) or a[k] < (0 if k == "memory" else 1):
            return f"ann.{k} {a.get(k)!r} is not a positive integer"
    if a["dim"] != m.dim:
        return f"ann.dim {a['dim']} differs from dim {m.dim}"
    if a["nprobe"] > a["nlist"]:
        return f"ann.nprobe {a['nprobe']} exceeds nlist {a['nlist']}"
    codec = a.get("codec")
    try:
        cb = ann.code_bytes(codec, m.dim) if isinstance(codec, str) else None
    except InputError:
        cb = None
    if cb is None or cb != a["code_bytes"]:
        return f"ann.codec {codec!r} for dimension {m.dim}"
    if not isinstance(a.get("quantizer"), str) or not IVF_NAME.match(a["quantizer"]):
        return f"ann.quantizer {a.get('quantizer')!r}"
    if a.get("recall") is not None and not (_is_num(a["recall"]) and 0 <= a["recall"] <= 1):
        return f"ann.recall {a['recall']!r} is not in [0, 1]"
    if not isinstance(a.get("quantizer_sha256", ""), str):
        return "ann.quantizer_sha256 is not a string"
    if any(s.lists_only and codec != "SQfp16" for s in m.segments):
        return f"lists-only codes with codec {codec}"
    c = m.config
    if not isinstance(c, dict):
        return "config is not an object"
    types = {"max_memory": (_is_int, True), "flat_max": (_is_int, False), "target_recall": (_is_num, False),
             "retrain_growth": (_is_num, False), "retune_growth": (_is_num, False), "codec": (lambda v: isinstance(v, str), True),
             "nlist": (_is_int, True), "seed": (_is_int, False)}
    for k, (ok, nullable) in types.items():
        if k in c and not ((nullable and c[k] is None) or ok(c[k])):
            return f"config.{k} {c[k]!r}"
    try:
        ann.AnnConfig.from_dict(c).validate()
    except InputError as e:
        return f"config: {e}"
    return None


def write_manifest(folder, m: Manifest) -> None:
    from clipkit.core.outputs import write_text_atomic
    m.updated = now()
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(m.to_dict(), indent=1), overwrite=True)


def new_index_id() -> str:
    return uuid.uuid4().hex


# ---- metadata ---------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, real TEXT NOT NULL,
    size INT, mtime INT, caption TEXT, shard TEXT, member TEXT, added INT NOT NULL, removed INT);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE INDEX IF NOT EXISTS items_real ON items(real);
CREATE INDEX IF NOT EXISTS items_shard ON items(shard);
CREATE INDEX IF NOT EXISTS items_removed ON items(removed);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL, gen INT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (gen INTEGER PRIMARY KEY, index_id TEXT NOT NULL, rows INT NOT NULL,
    alive INT NOT NULL, dim INT NOT NULL);
"""
ALIVE = "added <= ? AND (removed IS NULL OR removed > ?)"


def regular_file(path, what: str = "index file") -> None:
    """Refuse anything but a regular file (a FIFO, socket or device would block or never end), with
    core's one check (:func:`clipkit.core.io.open_regular`)."""
    from clipkit.core.io import open_regular
    try:
        open_regular(path).close()
    except ImageLoadError as e:
        raise InputError(f"cannot read {what} {path}: {e.reason}; {REBUILD}") from None


@contextlib.contextmanager
def meta_errors(folder) -> Iterator[None]:
    """SQLite errors of an index's metadata as one line naming the file."""
    p = Path(folder) / META
    try:
        yield
    except sqlite3.DatabaseError as e:
        msg = str(e)
        if "readonly" in msg or "read-only" in msg:
            raise InputError(f"{p} holds an unfinished transaction of an interrupted `index add` that a "
                             f"read-only process cannot roll back: run `clipkit index info {folder}` once "
                             f"with write access to {folder}") from None
        if "no such table" in msg or "no such column" in msg:
            raise InputError(f"{p} does not belong to this index ({e}); {REBUILD}") from None
        if "locked" in msg or "busy" in msg:
            raise InputError(f"{p} is locked by another process ({e}); try again") from None
        raise InputError(f"{p} is damaged ({e}); {REBUILD}") from None


def open_meta(folder, writable: bool) -> sqlite3.Connection:
    """The metadata database. Readers open it read-only unless a killed writer left a hot journal and
    the folder is writable: then read-write, so that SQLite rolls the unfinished transaction back."""
    p = Path(folder) / META
    if writable:
        if os.path.lexists(p):
            regular_file(p)
        # a rollback journal, not WAL: readers then need no -shm file (an index on read-only media
        # opens); writers are serialised by the index lock anyway
        with meta_errors(folder):
            db = sqlite3.connect(str(p), timeout=60, isolation_level=None, check_same_thread=False)
            db.executescript(SCHEMA)
        return db
    if not os.path.lexists(p):
        raise InputError(f"{folder} is damaged: {META} is missing; {REBUILD}")
    regular_file(p)
    journal = Path(str(p) + "-journal")
    mode = "ro"
    if os.path.lexists(journal):
        regular_file(journal)
        if _can_write(folder, p):
            mode = "rw"
    with meta_errors(folder):
        return sqlite3.connect(f"file:{p}?mode={mode}", uri=True, timeout=60, isolation_level=None,
                               check_same_thread=False)


def _can_write(folder, p) -> bool:
    return os.access(folder, os.W_OK | os.X_OK) and os.access(p, os.W_OK)


def insert_items(db: sqlite3.Connection, items: Sequence[Item], gen: int) -> None:
    db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                   [(it.id, it.path, it.real, it.size, it.mtime, it.caption, it.shard, it.member, gen)
                    for it in items])


def record_generation(db: sqlite3.Connection, m: Manifest) -> None:
    """The identity of generation ``m.generation`` (inside the writer's transaction)."""
    db.execute("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?)",
               (m.generation, m.index_id, m.rows, m.alive, m.dim))


def check_identity(folder, m: Manifest, db: sqlite3.Connection) -> None:
    """meta.sqlite must be this index's, at this generation (format 1: no identity recorded)."""
    with meta_errors(folder):
        db.execute("SELECT id FROM items LIMIT 1").fetchall()          # reads the header: damage shows here
        if not m.index_id:
            return
        row = db.execute("SELECT index_id, rows, alive, dim FROM generations WHERE gen = ?",
                         (m.generation,)).fetchone()
    want = (m.index_id, m.rows, m.alive, m.dim)
    if row is None or tuple(row) != want:
        got = "no record of it" if row is None else f"index {row[0][:8]}, {row[1]} rows, {row[2]} items, {row[3]}-d"
        raise InputError(f"{Path(folder) / META} does not belong to {Path(folder) / MANIFEST} (generation "
                         f"{m.generation} of index {m.index_id[:8]}: {m.rows} rows, {m.alive} items, {m.dim}-d; "
                         f"it has {got}); {REBUILD}")


# ---- segments ---------------------------------------------------------------------------------

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


# ---- the model an index was built with ----------------------------------------------------------

def canonical_spec(spec: str) -> str:
    """The spec an index records: a local model directory as an absolute path (a relative one would
    name another model, or none, from another working directory); others as written."""
    from clipkit.core.registry import parse_spec
    try:
        s = parse_spec(spec, "clip")
    except Exception:
        return spec
    if s.source.bundled or s.kind in ("openclip", "hf"):
        return spec
    return os.path.abspath(s.target) if isinstance(s.target, str) and os.path.exists(s.target) else spec


def same_model(a: str, b: str) -> bool:
    """Whether two specs name the same model (a local directory by its real path)."""
    if a == b:
        return True
    ca, cb = canonical_spec(a), canonical_spec(b)
    if ca == cb:
        return True
    return os.path.isabs(ca) and os.path.isabs(cb) and os.path.realpath(ca) == os.path.realpath(cb)


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


# ---- reading ------------------------------------------------------------------------------------

class IndexReader:
    """An index opened for search: manifest, memory-mapped segments, metadata, and (built on first
    use) the FAISS structure with the visible items. Thread-safe for searching. Opening checks the
    pieces against each other (see the module docstring); every failure is an InputError naming
    the file."""

    def __init__(self, path, *, db: sqlite3.Connection | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.plan = ann.AnnPlan.from_dict(m.ann)
        self.config = ann.AnnConfig.from_dict(m.config)
        self.db = db or open_meta(self.path, writable=False)
        try:
            check_identity(self.path, m, self.db)
            self._emb = [load_rows(self.path / s.emb, np.float16, s.rows, m.dim) for s in m.segments]
            self._codes = [load_rows(self.path / s.codes, np.uint8, s.rows) for s in m.segments]
            regular_file(self.path / m.ann["quantizer"])
        except BaseException:
            if db is None:
                self.close()
            raise
        self._lock = threading.Lock()
        self._starts = np.array([s.start for s in m.segments], dtype=np.int64)
        self._ann = None
        self._tars = None
        self._checked = weakref.WeakSet()
        self.nprobe = int(m.ann.get("nprobe", 1))

    # -- identity -------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.alive

    def check_model(self, spec: str, preprocess) -> None:
        """Refuse a CLIP other than the one the index was built with (its embeddings live in
        another space): another spec (a local directory compared by its real path), or other
        preprocessing."""
        check_spec(self.path, self.manifest, spec, preprocess)

    def check_scorer(self, scorer) -> None:
        """:meth:`check_model`, then the weights: a model whose weights differ from those the index
        was built with (a directory changed in place) is refused. Once per scorer."""
        if scorer in self._checked:
            return
        check_scorer(self.path, self.manifest, scorer)
        self._checked.add(scorer)

    # -- vectors ----------------------------------------------------------------------------------
    def vectors(self, ids) -> np.ndarray:
        """[len(ids), D] fp32 stored embeddings of ``ids`` (any order), re-normalised to unit length
        (fp16 storage leaves norms within ~1e-4 of 1; a cosine is of unit vectors). A stored row that
        is not a finite unit vector is refused (InputError naming its file)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not len(ids):
            return out
        if ids.min() < 0 or ids.max() >= self.manifest.rows:
            raise ItemNotFound(f"no item with id {int(ids.max() if ids.max() >= self.manifest.rows else ids.min())}")
        seg = np.searchsorted(self._starts, ids, side="right") - 1
        for s in np.unique(seg):
            sel = np.nonzero(seg == s)[0]
            rows = ids[sel] - self._starts[s]
            order = np.argsort(rows)
            out[sel[order]] = self._emb[s][rows[order]]
            check_unit(out[sel], self.path / self.manifest.segments[s].emb, rows)
        out /= np.maximum(np.linalg.norm(out.astype(np.float64), axis=1, keepdims=True), 1e-12).astype(np.float32)
        return out

    def alive_mask(self, gen: int | None = None) -> np.ndarray:
        """[rows] bool: which ids are visible at ``gen`` (default: the manifest's)."""
        with self._lock:
            return self._alive_mask_unlocked(gen)

    def iter_vectors(self, chunk: int = 65536, mask: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids [B], fp32 vectors [B, D]) of the visible items, in id order."""
        mask = self.alive_mask() if mask is None else mask
        for s, emb in zip(self.manifest.segments, self._emb):
            for a, b in ann.batches(s.rows, chunk):
                keep = np.nonzero(mask[s.start + a:s.start + b])[0]
                if len(keep):
                    x = np.asarray(emb[a:b][keep], dtype=np.float32)
                    yield keep + s.start + a, check_unit(x, self.path / s.emb, keep + a)

    def verify(self) -> dict:
        """Read every file of the index against the sha256 the manifest records (format 1 indexes
        record none: then only the row checks) and every row as a finite unit vector. -> a summary;
        raises InputError naming the first damaged file."""
        m = self.manifest
        checked = 0
        for s, emb, codes in zip(m.segments, self._emb, self._codes):
            for a, b in ann.batches(s.rows, 65536):
                check_unit(np.asarray(emb[a:b], dtype=np.float32), self.path / s.emb, a)
            for name, arr, want in ((s.emb, emb, s.emb_sha256), (s.codes, codes, s.codes_sha256)):
                if want:
                    if file_sha256(arr) != want:
                        raise InputError(f"index file {self.path / name} is damaged (its sha256 differs "
                                         f"from the manifest's); {REBUILD}")
                    checked += 1
        read_quantizer(self.path, m)
        checked += bool(m.ann.get("quantizer_sha256"))
        with meta_errors(self.path):
            ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise InputError(f"{self.path / META} is damaged ({ok}); {REBUILD}")
        return {"files_checked_sha256": checked, "rows_checked": m.rows, "ok": True}

    # -- ANN --------------------------------------------------------------------------------------
    def ann_index(self):
        """The FAISS structure with every visible item (assembled from the stored codes once)."""
        with self._lock:
            if self._ann is None:
                self._ann = self._assemble()
            return self._ann

    def _assemble(self):
        m = self.manifest
        index = read_quantizer(self.path, m)
        mask = self._alive_mask_unlocked()
        ann.assemble(index, [ann.SegmentCodes(codes, emb if s.lists_only else None, s.start,
                                              mask[s.start:s.start + s.rows], str(self.path / s.codes),
                                              str(self.path / s.emb))
                             for s, codes, emb in zip(m.segments, self._codes, self._emb)])
        ann.set_nprobe(index, self.nprobe)
        return index

    def _alive_mask_unlocked(self, gen: int | None = None) -> np.ndarray:
        g = self.manifest.generation if gen is None else gen
        mask = np.zeros(self.manifest.rows, dtype=bool)
        with meta_errors(self.path):
            cur = self.db.execute(f"SELECT id FROM items WHERE {ALIVE}", (g, g))
            while True:
                chunk = cur.fetchmany(100_000)
                if not chunk:
                    break
                ids = np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk))
                if ids.min() < 0 or ids.max() >= len(mask):
                    raise InputError(f"{self.path / META} does not belong to this index (item id "
                                     f"{int(ids.max())} beyond its {len(mask)} rows); {REBUILD}")
                mask[ids] = True
        return mask

    def memory_bytes(self) -> int:
        return ann.memory_bytes(self.ann_index())

    # -- metadata -------------------------------------------------------------------------------
    def items(self, ids: Sequence[int], alive_only: bool = True) -> dict[int, Item]:
        ids = [int(i) for i in ids]
        out: dict[int, Item] = {}
        g = self.manifest.generation
        with self._lock, meta_errors(self.path):
            for a in range(0, len(ids), 500):
                part = ids[a:a + 500]
                q = ",".join("?" * len(part))
                where = f"id IN ({q})" + (f" AND {ALIVE}" if alive_only else "")
                args = part + ([g, g] if alive_only else [])
                for row in self.db.execute(
                        f"SELECT id, path, real, size, mtime, caption, shard, member FROM items WHERE {where}", args):
                    out[row[0]] = Item(*row)
        return out

    def item(self, id: int) -> Item:
        it = self.items([id]).get(int(id))
        if it is None:
            raise ItemNotFound(f"no item with id {id} in the index")
        return it

    def alive_items(self, where: str = "", args: tuple = ()) -> Iterator[Item]:
        g = self.manifest.generation
        with self._lock, meta_errors(self.path):
            rows = self.db.execute(f"SELECT id, path, real, size, mtime, caption, shard, member FROM items "
                                   f"WHERE {ALIVE}{' AND ' + where if where else ''} ORDER BY id",
                                   (g, g) + tuple(args)).fetchall()
        for row in rows:
            yield Item(*row)

    def indexed_files(self, *paths) -> list[str]:
        """Which of ``paths`` (outputs about to be written) are files of visible items (an image, or
        the shard holding one), by name or real path: -> their real paths, to pass as ``inputs`` to
        :func:`clipkit.core.outputs.check_output_file` (an output that is an input is refused)."""
        names = set()
        for p in paths:
            if p:
                names |= {os.path.abspath(p), os.path.realpath(p)}
        if not names:
            return []
        g = self.manifest.generation
        q = ",".join("?" * len(names))
        args = list(names)
        with self._lock, meta_errors(self.path):
            rows = self.db.execute(f"SELECT path, real, shard FROM items WHERE (path IN ({q}) OR real IN ({q}) "
                                   f"OR shard IN ({q})) AND {ALIVE}", args * 3 + [g, g]).fetchall()
        hit = {x for r in rows for x in r if x}
        return sorted(p for p in names if p in hit or os.path.realpath(p) in hit)

    # -- the images behind the items (serving, contact sheets) ---------------------------------
    def item_bytes(self, it: Item, max_bytes: int = 64 << 20) -> bytes:
        """The bytes of an item's image, only if it is still the file that was indexed: the same
        real path (no link planted since), a regular file, the same size and mtime. Shard members
        are read from their shard under the same rule. Raises InputError."""
        from clipkit.core.errors import ImageLoadError
        from clipkit.core.io import open_regular
        if not it.real:
            raise ItemNotFound(f"item {it.id} has no image (the index holds bare vectors)")
        if it.shard:
            if os.path.realpath(it.shard) != it.real:
                raise ItemNotFound(f"{it.shard} changed since it was indexed (run `clipkit index add`)")
            if self._tars is None:
                from clipkit.search.sources import TarReader
                self._tars = TarReader()
            try:
                return self._tars.read(it.real, it.member, expect=(it.size, it.mtime))
            except ItemNotFound:
                raise
            except InputError as e:
                raise ItemNotFound(str(e)) from None
        if os.path.realpath(it.path) != it.real:
            raise ItemNotFound(f"{it.path} changed since it was indexed (run `clipkit index add`)")
        try:
            fh = open_regular(it.real)
        except ImageLoadError as e:
            raise ItemNotFound(f"cannot read {it.path}: {e.reason}") from None
        with fh:
            st = os.fstat(fh.fileno())
            if (st.st_size, st.st_mtime_ns) != (it.size, it.mtime):
                raise ItemNotFound(f"{it.path} changed since it was indexed (run `clipkit index add`)")
            if st.st_size > max_bytes:
                raise ItemNotFound(f"{it.path} is larger than {max_bytes >> 20} MiB")
            return fh.read(max_bytes + 1)

    def item_image(self, it: Item | int):
        """An item's image, decoded by the robust loader (PIL RGB). Raises a ClipkitError."""
        from clipkit.core.io import load_image_bytes
        it = self.item(it) if isinstance(it, (int, np.integer)) else it
        return load_image_bytes(self.item_bytes(it), it.path)

    def skipped(self) -> list[dict]:
        g = self.manifest.generation
        with self._lock, meta_errors(self.path):
            return [{"path": p, "reason": r} for p, r in
                    self.db.execute("SELECT path, reason FROM skipped WHERE gen <= ? ORDER BY path", (g,))]

    def disk_bytes(self) -> dict:
        """Bytes on disk by kind: embeddings (fp16 segments), codes (list numbers or codes), quantiser,
        metadata."""
        m = self.manifest

        def size(name):
            with contextlib.suppress(OSError):
                return os.stat(self.path / name).st_size
            return 0
        return {"embeddings": sum(size(s.emb) for s in m.segments),
                "codes": sum(size(s.codes) for s in m.segments),
                "quantizer": size(m.ann["quantizer"]), "metadata": size(META)}

    def info(self) -> dict:
        m = self.manifest
        raw = m.alive * m.dim * 2
        disk = self.disk_bytes()
        return {"index": str(self.path), "model": m.model, "weights_sha256": m.weights or None, "dim": m.dim,
                "items": m.alive, "rows": m.rows,
                "generation": m.generation, "structure": m.ann.get("factory"), "kind": m.ann.get("kind"),
                "nprobe": self.nprobe, "tuned_recall_at_10": m.ann.get("recall"),
                "tuned_on": m.ann.get("tuned_on", "index vectors"),
                "estimated_memory_bytes": ann.estimate_memory(m.alive, m.dim, self.plan.codec, self.plan.nlist),
                "raw_fp16_bytes": raw, "disk_bytes": sum(disk.values()),
                "disk_vectors_vs_raw_fp16": round((disk["embeddings"] + disk["codes"]) / max(1, m.rows * m.dim * 2), 3),
                "segments": len(m.segments), "format": m.version, "index_id": m.index_id or None,
                "sources": m.sources, "created": m.created, "updated": m.updated}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()


def check_spec(where, m: Manifest, spec: str, preprocess) -> None:
    """Refuse a CLIP spec or preprocessing other than the index's (see :meth:`IndexReader.check_model`)."""
    pp = preprocess.to_dict() if hasattr(preprocess, "to_dict") else preprocess
    if not same_model(spec, m.model):
        raise ModelLoadError(spec, f"index {where} was built with CLIP {m.model!r}, whose "
                             "embeddings are not comparable", f"drop --clip, or pass --clip {m.model}")
    if _canon(json.loads(json.dumps(pp))) != _canon(m.preprocess):
        raise ModelLoadError(spec, f"index {where} was built with other preprocessing "
                             f"({m.preprocess}) for this CLIP", "rebuild the index")


def check_scorer(where, m: Manifest, scorer) -> None:
    """:func:`check_spec`, then the weights: a model whose weights differ from those the index was
    built with (a directory changed in place) is refused. Weights are compared at the precision the
    index was built with (fp16 weights are another digest of the same model)."""
    check_spec(where, m, scorer.spec, scorer.preprocess)
    if m.weights and getattr(scorer, "precision", None) == m.precision:
        digest = getattr(scorer, "weights_digest", None)
        if digest is not None and digest != m.weights:
            raise ModelLoadError(scorer.spec, f"its weights (sha256 {digest[:12]}) are not those index {where} "
                                 f"was built with (sha256 {m.weights[:12]}): the model changed since",
                                 "rebuild the index with `clipkit index build ... --overwrite`, or restore the model")
