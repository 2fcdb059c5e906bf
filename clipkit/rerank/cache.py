"""Embedding cache keyed by (model spec + preprocessing) and (file path, size, mtime).

One SQLite database per model key under the user cache dir (``$XDG_CACHE_HOME/clipkit`` or
``~/.cache/clipkit``) or ``--cache DIR``. SQLite gives what we need for free: every batch is one
atomic transaction (an interrupted run keeps what it finished and resumes there), WAL mode lets
several processes read and write one cache without corrupting it, and lookups are indexed.
Files that could not be read are remembered too (with their reason), keyed the same way, so a
re-run does not retry a file that has not changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_SQL_CHUNK = 500      # paths per IN (...) query (SQLite's variable limit is 999 in old builds)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "clipkit" / "embeddings"


def model_key(spec: str, preprocess) -> str:
    """A stable key for a model spec + its preprocessing settings."""
    blob = json.dumps({"spec": spec, "preprocess": preprocess.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_key(path) -> tuple[str, int, int]:
    """(real path, size, mtime in ns); raises OSError for a missing or unreadable entry."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns     # == str(Path(path).resolve())


@dataclass
class CacheLookup:
    hits: list[int]           # positions in the keys looked up, in the order of ``vectors``' rows
    vectors: np.ndarray       # [len(hits), D] fp32
    bad: dict[int, str]       # position -> reason, for known-bad unchanged files


class EmbeddingCache:
    def __init__(self, root, spec: str, preprocess):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = model_key(spec, preprocess)
        self.path = self.root / f"{self.key}.sqlite"
        self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (path TEXT PRIMARY KEY, size INT, mtime INT, "
                        "dim INT, vec BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS bad (path TEXT PRIMARY KEY, size INT, mtime INT, reason TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('spec', ?), ('preprocess', ?)",
                        (spec, json.dumps(preprocess.to_dict())))

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
