"""The index on disk, and reading it.

An index is a folder::

    INDEX/manifest.json          the commit point: generation, model spec + preprocessing, segments,
                                 the ANN plan (codec, nlist, tuned nprobe), the typed configs
    INDEX/emb-000001.npy         L2-normalised fp16 embeddings [rows, D] of one segment (memory-mapped)
    INDEX/codes-000001-g1.npy    the segment's FAISS standalone codes [rows, C] uint8 (quantiser of gen 1)
    INDEX/ivf-g1.faiss           the trained, empty FAISS structure (coarse centroids, codec tables)
    INDEX/meta.sqlite            items(id, path, real, size, mtime, caption, shard, member, added, removed)

Ids are row numbers across the segments and never change. An item is visible at generation G when
``added <= G`` and it was not ``removed`` at or before G, so a writer (``index add``) prepares a new
segment, new codes and new metadata rows tagged G+1 while readers keep using G, and commits by
replacing ``manifest.json`` atomically; files and rows of an uncommitted generation are cleaned up
by the next writer (:func:`recover`). Writers take an exclusive lock on ``INDEX/.lock``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.search import ann

log = logging.getLogger(__name__)

FORMAT = "clipkit-index"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.sqlite"
LOCK = ".lock"
_OURS = re.compile(r"^(emb-\d+\.npy|codes-\d+-g\d+\.npy|ivf-g\d+\.faiss|\..*\.tmp.*)$")


class ItemNotFound(InputError):
    """No such visible item, or its image is no longer the file that was indexed."""


@dataclass
class Segment:
    emb: str            # fp16 [rows, D] .npy
    codes: str          # uint8 [rows, C] .npy: FAISS standalone codes under the current quantiser
    start: int          # first id
    rows: int


@dataclass
class Manifest:
    model: str                        # CLIP spec the embeddings come from
    preprocess: dict                  # its preprocessing (PreprocessConfig.to_dict())
    dim: int
    ann: dict                         # AnnPlan.to_dict() + quantizer, nprobe, recall, trained_generation
    config: dict                      # AnnConfig (asdict)
    segments: list[Segment] = field(default_factory=list)
    generation: int = 1
    rows: int = 0                     # ids handed out so far (alive + removed)
    alive: int = 0                    # searchable items
    sources: list[str] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["segments"] = [Segment(**s) for s in d.get("segments", [])]
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
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir():
        raise InputError(f"{p} is not an index folder (build one with `clipkit index build`)")
    if not mf.is_file():
        raise InputError(f"{p} is not a clipkit index (no {MANIFEST}; build one with `clipkit index build`)")
    from clipkit.core.io import read_text_file
    try:
        d = json.loads(read_text_file(mf, "index manifest"))
    except ValueError as e:
        raise InputError(f"{mf} is damaged ({e}); rebuild the index") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(f"{mf} is not a clipkit index manifest")
    if d.get("version", 0) > VERSION:
        raise InputError(f"{p} was written by a newer clipkit (index format {d['version']}); upgrade clipkit")
    try:
        return Manifest.from_dict(d)
    except TypeError as e:
        raise InputError(f"{mf} is damaged ({e}); rebuild the index") from None


def write_manifest(folder, m: Manifest) -> None:
    from clipkit.core.outputs import write_text_atomic
    m.updated = now()
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(m.to_dict(), indent=1), overwrite=True)


# ---- metadata ---------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, real TEXT NOT NULL,
    size INT, mtime INT, caption TEXT, shard TEXT, member TEXT, added INT NOT NULL, removed INT);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE INDEX IF NOT EXISTS items_shard ON items(shard);
CREATE INDEX IF NOT EXISTS items_removed ON items(removed);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL, gen INT NOT NULL);
"""
ALIVE = "added <= ? AND (removed IS NULL OR removed > ?)"


def open_meta(folder, writable: bool) -> sqlite3.Connection:
    p = Path(folder) / META
    if writable:
        # a rollback journal, not WAL: readers then need no -shm file (an index on read-only media
        # opens); writers are serialised by the index lock anyway
        db = sqlite3.connect(str(p), timeout=60, isolation_level=None, check_same_thread=False)
        db.executescript(SCHEMA)
        return db
    if not p.is_file():
        raise InputError(f"{folder} is damaged: {META} is missing; rebuild the index")
    return sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=60, isolation_level=None,
                           check_same_thread=False)


def insert_items(db: sqlite3.Connection, items: Sequence[Item], gen: int) -> None:
    db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                   [(it.id, it.path, it.real, it.size, it.mtime, it.caption, it.shard, it.member, gen)
                    for it in items])


# ---- segments ---------------------------------------------------------------------------------

class NpyAppender:
    """Append rows to a ``.npy`` file of unknown final length: the header is written padded to a
    fixed size and rewritten with the row count at :meth:`close` (the file is then an ordinary .npy)."""

    HEADER = 128

    def __init__(self, path, dtype, width: int):
        self.path, self.dtype, self.width, self.rows = Path(path), np.dtype(dtype), width, 0
        self.f = open(self.path, "xb")
        self.f.write(self._header(0))

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
        self.f.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> int:
        self.f.seek(0)
        self.f.write(self._header(self.rows))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.rows


def load_rows(path) -> np.ndarray:
    """A segment file, memory-mapped read-only (an empty one as an empty array)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:                       # mmap of a zero-row file
        return np.load(path)
    except OSError as e:
        raise InputError(f"cannot read index file {path}: {e.strerror or e}; rebuild the index") from None


# ---- writers' lock and recovery -----------------------------------------------------------------

@contextlib.contextmanager
def locked(folder) -> Iterator[None]:
    """Exclusive writer lock (``flock`` on INDEX/.lock, never through a symlink)."""
    import fcntl
    p = Path(folder) / LOCK
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise InputError(f"cannot lock index {folder}: {e.strerror or e}") from None
    try:
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
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM items WHERE added > ?", (g,))
        db.execute("UPDATE items SET removed = NULL WHERE removed > ?", (g,))
        db.execute("DELETE FROM skipped WHERE gen > ?", (g,))
    keep = {s.emb for s in m.segments} | {s.codes for s in m.segments} | {m.ann.get("quantizer")}
    for name in os.listdir(folder):
        if _OURS.match(name) and name not in keep:
            with contextlib.suppress(OSError):
                os.unlink(Path(folder) / name)


# ---- reading ------------------------------------------------------------------------------------

class IndexReader:
    """An index opened for search: manifest, memory-mapped segments, metadata, and (built on first
    use) the FAISS structure with the visible items. Thread-safe for searching."""

    def __init__(self, path, *, db: sqlite3.Connection | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.plan = ann.AnnPlan.from_dict(m.ann)
        self.config = ann.AnnConfig.from_dict(m.config)
        self.db = db or open_meta(self.path, writable=False)
        self._lock = threading.Lock()
        self._emb = [load_rows(self.path / s.emb) for s in m.segments]
        self._starts = np.array([s.start for s in m.segments], dtype=np.int64)
        self._ann = None
        self._tars = None
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
        another space)."""
        pp = preprocess.to_dict() if hasattr(preprocess, "to_dict") else preprocess
        if spec != self.model:
            raise ModelLoadError(spec, f"index {self.path} was built with CLIP {self.model!r}, whose "
                                 "embeddings are not comparable", f"drop --clip, or pass --clip {self.model}")
        if _canon(json.loads(json.dumps(pp))) != _canon(self.manifest.preprocess):
            raise ModelLoadError(spec, f"index {self.path} was built with other preprocessing "
                                 f"({self.manifest.preprocess}) for this CLIP", "rebuild the index")

    # -- vectors ----------------------------------------------------------------------------------
    def vectors(self, ids) -> np.ndarray:
        """[len(ids), D] fp32 stored embeddings of ``ids`` (any order), re-normalised to unit length
        (fp16 storage leaves norms within ~1e-4 of 1; a cosine is of unit vectors)."""
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
                    yield keep + s.start + a, np.asarray(emb[a:b][keep], dtype=np.float32)

    # -- ANN --------------------------------------------------------------------------------------
    def ann_index(self):
        """The FAISS structure with every visible item (assembled from the stored codes once)."""
        with self._lock:
            if self._ann is None:
                self._ann = self._assemble()
            return self._ann

    def _assemble(self):
        m = self.manifest
        q = m.ann.get("quantizer")
        data = (self.path / q).read_bytes() if q else b""
        if not data:
            raise InputError(f"index {self.path} is damaged: its FAISS structure {q} is missing; rebuild it")
        index = ann.deserialize(data)
        mask = self._alive_mask_unlocked()
        ann.assemble(index, [(load_rows(self.path / s.codes), s.start, mask[s.start:s.start + s.rows])
                             for s in m.segments])
        ann.set_nprobe(index, self.nprobe)
        return index

    def _alive_mask_unlocked(self, gen: int | None = None) -> np.ndarray:
        g = self.manifest.generation if gen is None else gen
        mask = np.zeros(self.manifest.rows, dtype=bool)
        cur = self.db.execute(f"SELECT id FROM items WHERE {ALIVE}", (g, g))
        while True:
            chunk = cur.fetchmany(100_000)
            if not chunk:
                return mask
            mask[np.fromiter((r[0] for r in chunk), dtype=np.int64, count=len(chunk))] = True

    def memory_bytes(self) -> int:
        return ann.memory_bytes(self.ann_index())

    # -- metadata -------------------------------------------------------------------------------
    def items(self, ids: Sequence[int], alive_only: bool = True) -> dict[int, Item]:
        ids = [int(i) for i in ids]
        out: dict[int, Item] = {}
        g = self.manifest.generation
        with self._lock:
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
        with self._lock:
            rows = self.db.execute(f"SELECT id, path, real, size, mtime, caption, shard, member FROM items "
                                   f"WHERE {ALIVE}{' AND ' + where if where else ''} ORDER BY id",
                                   (g, g) + tuple(args)).fetchall()
        for row in rows:
            yield Item(*row)

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
        with self._lock:
            return [{"path": p, "reason": r} for p, r in
                    self.db.execute("SELECT path, reason FROM skipped WHERE gen <= ? ORDER BY path", (g,))]

    def info(self) -> dict:
        m = self.manifest
        raw = m.alive * m.dim * 2
        return {"index": str(self.path), "model": m.model, "dim": m.dim, "items": m.alive, "rows": m.rows,
                "generation": m.generation, "structure": m.ann.get("factory"), "kind": m.ann.get("kind"),
                "nprobe": self.nprobe, "tuned_recall_at_10": m.ann.get("recall"),
                "estimated_memory_bytes": ann.estimate_memory(m.alive, m.dim, self.plan.codec, self.plan.nlist),
                "raw_fp16_bytes": raw, "segments": len(m.segments), "sources": m.sources,
                "created": m.created, "updated": m.updated}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
