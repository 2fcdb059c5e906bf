"""Reading an index: :class:`IndexReader` (the layout of the folder: :mod:`clipkit.search.manifest`).

The pieces are checked against each other on open (:class:`IndexReader`): the manifest's fields
(types, ranges, file names), the ``generations`` row of its generation in meta.sqlite (the same
index id, rows, alive items, dimension), every segment file's header and size, the quantiser's
sha256 when it is read; every stored row read is checked to be a finite unit vector. ``index info
--verify`` reads every file against its sha256. Only regular files are opened (a FIFO never hangs).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clipkit.core.errors import InputError
from clipkit.search import ann
from clipkit.search.manifest import META, REBUILD, check_scorer, check_spec, read_manifest, regular_file
from clipkit.search.meta import ALIVE, Item, check_identity, meta_errors, open_meta
from clipkit.search.segments import check_unit, file_sha256, load_rows, read_quantizer


class ItemNotFound(InputError):
    """No such visible item, or its image is no longer the file that was indexed."""


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
