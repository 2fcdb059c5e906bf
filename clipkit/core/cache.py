"""Embedding cache keyed by (model weights + preprocessing) and (file path, size, mtime).

The model half of the key is a digest of the loaded model's weights (:func:`weights_digest`), not
its spec: a directory whose weights were replaced, or a bundled model of a new release, never gets
the old model's embeddings back. One SQLite database per model key under the user cache dir
(``$XDG_CACHE_HOME/clipkit`` or ``~/.cache/clipkit``) or ``--cache DIR``. SQLite gives what we
need for free: every batch is one atomic transaction (an interrupted run keeps what it finished and
resumes there), WAL mode lets several processes read and write one cache without corrupting it,
and lookups are indexed.
Files that could not be read *because of their bytes* (corrupt, not an image) are remembered too
(with their reason), keyed the same way, so a re-run does not retry a file that has not changed;
passing causes (a timeout, a permission, a FIFO) are never remembered and are retried.
A damaged cache file is moved aside as ``*.corrupt`` and rebuilt; a cache folder that cannot be
written means a run without the cache (:func:`open_cache`), never a failed run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

_SQL_CHUNK = 500      # paths per IN (...) query (SQLite's variable limit is 999 in old builds)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "clipkit" / "embeddings"


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a model's weights: every ``state_dict`` tensor's name, dtype, shape and bytes, in
    name order (about 2 GB/s on one core: a ViT-B/32 in fp32 takes ~0.3 s)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_key(spec, preprocess=None, weights: str | None = None) -> str:
    """A stable key for a model + its preprocessing settings. ``spec`` may be a scorer (anything with
    ``spec``, ``preprocess`` and ``weights_digest``): then the key is its weights', whatever its
    spec; a spec string alone (``weights`` None) keys by the spec."""
    spec, preprocess, weights = _identity(spec, preprocess, weights)
    ident = {"spec": spec} if weights is None else {"weights": weights}
    blob = json.dumps({**ident, "preprocess": preprocess.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _identity(model, preprocess, weights):
    """(spec, preprocess, weights digest or None) of a scorer or a spec string."""
    if isinstance(model, str):
        return model, preprocess, weights
    return model.spec, preprocess if preprocess is not None else model.preprocess, \
        weights if weights is not None else getattr(model, "weights_digest", None)


def file_key(path) -> tuple[str, int, int]:
    """(real path, size, mtime in ns); raises OSError for a missing or unreadable entry."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns     # == str(Path(path).resolve())


@dataclass
class CacheLookup:
    hits: list[int]           # positions in the keys looked up, in the order of ``vectors``' rows
    vectors: np.ndarray       # [len(hits), D] fp32
    bad: dict[int, str]       # position -> reason, for known-bad unchanged files


#: Reasons older versions cached that are not properties of a file's bytes: never trusted.
_TRANSIENT = ("decoding took longer", "permission denied", "not a regular file", "out of memory")


def open_cache(root, spec, preprocess=None) -> "EmbeddingCache | None":
    """The cache for a model under ``root``, or None (with a warning) when it cannot be used: a folder
    that cannot be created or written runs without the cache; a damaged database file is moved aside
    as ``<name>.corrupt`` and a new one is started. ``spec``: the scorer (keyed by its weights, see
    :func:`model_key`) or a spec string."""
    spec, preprocess, weights = _identity(spec, preprocess, None)
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        log.warning("embedding cache %s unusable (%s): running without it", root, e.strerror or e)
        return None
    try:
        return EmbeddingCache(root, spec, preprocess, weights)
    except sqlite3.DatabaseError as e:
        path = root / f"{model_key(spec, preprocess, weights)}.sqlite"
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            log.warning("embedding cache %s is locked (%s): running without it", path, e)
            return None
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
            for side in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(str(path) + side)
        except OSError as e2:
            log.warning("embedding cache %s is damaged (%s) and cannot be moved aside (%s): running without it",
                        path, e, e2.strerror or e2)
            return None
        log.warning("embedding cache %s was damaged (%s): moved aside to %s, rebuilding", path, e, aside.name)
        try:
            return EmbeddingCache(root, spec, preprocess, weights)
        except sqlite3.DatabaseError as e3:
            log.warning("embedding cache %s unusable (%s): running without it", path, e3)
            return None


class EmbeddingCache:
    """The cache of one model (``spec``: a scorer, keyed by its weights, or a spec string; see
    :func:`model_key`)."""

    def __init__(self, root, spec, preprocess=None, weights: str | None = None):
        spec, preprocess, weights = _identity(spec, preprocess, weights)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = model_key(spec, preprocess, weights)
        self.path = self.root / f"{self.key}.sqlite"
        self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        try:
            self._setup(spec, preprocess, weights)
        except sqlite3.DatabaseError:
            self.db.close()
            raise

    def _setup(self, spec: str, preprocess, weights: str | None = None) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (path TEXT PRIMARY KEY, size INT, mtime INT, "
                        "dim INT, vec BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS bad (path TEXT PRIMARY KEY, size INT, mtime INT, reason TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('spec', ?), ('preprocess', ?), ('weights', ?)",
                        (spec, json.dumps(preprocess.to_dict()), weights or ""))
        row = self.db.execute("PRAGMA quick_check").fetchone()
        if not row or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")

    def lookup(self, keys: Sequence[tuple[str, int, int]]) -> CacheLookup:
        """Fresh hits and known-bad unchanged files among ``keys`` (callers pass one chunk at a time:
        the result holds the chunk's vectors as one array, nothing per row)."""
        want: dict[str, list[int]] = {}
        for n, k in enumerate(keys):
            want.setdefault(k[0], []).append(n)
        hit_pos, blobs, bad, dim = [], [], {}, None
        for i in range(0, len(keys), _SQL_CHUNK):
            paths = list(dict.fromkeys(k[0] for k in keys[i:i + _SQL_CHUNK]))
            q = ",".join("?" * len(paths))
            for p, size, mtime, d, vec in self.db.execute(
                    f"SELECT path, size, mtime, dim, vec FROM emb WHERE path IN ({q})", paths):
                if len(vec) != 4 * d or (dim is not None and d != dim):   # a damaged row: a miss, re-encoded
                    continue
                dim = d
                for n in want[p]:
                    if keys[n][1:] == (size, mtime):
                        hit_pos.append(n)
                        blobs.append(vec)
            for p, size, mtime, reason in self.db.execute(
                    f"SELECT path, size, mtime, reason FROM bad WHERE path IN ({q})", paths):
                if reason.startswith(_TRANSIENT):
                    continue
                for n in want[p]:
                    if keys[n][1:] == (size, mtime):
                        bad[n] = reason
        for n in hit_pos:
            bad.pop(n, None)
        vectors = np.frombuffer(bytearray().join(blobs), dtype=np.float32).reshape(len(blobs), dim or 0)
        return CacheLookup(hit_pos, vectors, bad)

    def put(self, keys: Sequence[tuple[str, int, int]], embeddings: torch.Tensor | None = None,
            bad: Sequence[tuple[tuple[str, int, int], str]] = ()) -> None:
        """Store one batch atomically (a single transaction): ``embeddings[n]`` for ``keys[n]``."""
        vecs = embeddings.detach().to("cpu", torch.float32).numpy() if len(keys) else None   # [B, D]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?, ?, ?)",
                                [(k[0], k[1], k[2], vecs.shape[1], vecs[n].tobytes()) for n, k in enumerate(keys)])
            self.db.executemany("INSERT OR REPLACE INTO bad VALUES (?, ?, ?, ?)",
                                [(k[0], k[1], k[2], r) for k, r in bad])
            self.db.executemany("DELETE FROM bad WHERE path = ?", [(k[0],) for k in keys])

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM emb").fetchone()[0]

    def close(self):
        self.db.close()
