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
from pathlib import Path

import numpy as np
import torch


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "clipkit" / "embeddings"


def model_key(spec: str, preprocess) -> str:
    """A stable key for a model spec + its preprocessing settings."""
    blob = json.dumps({"spec": spec, "preprocess": preprocess.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


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

    def lookup(self, keys: list[tuple[str, int, int]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """-> ({path: embedding} for fresh hits, {path: reason} for known-bad unchanged files)."""
        hits, bad = {}, {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = ",".join("?" * len(chunk))
            paths = [k[0] for k in chunk]
            want = {k[0]: (k[1], k[2]) for k in chunk}
            for p, size, mtime, dim, vec in self.db.execute(
                    f"SELECT path, size, mtime, dim, vec FROM emb WHERE path IN ({q})", paths):
                if want[p] == (size, mtime):
                    hits[p] = np.frombuffer(vec, dtype=np.float32, count=dim)
            for p, size, mtime, reason in self.db.execute(
                    f"SELECT path, size, mtime, reason FROM bad WHERE path IN ({q})", paths):
                if want[p] == (size, mtime):
                    bad[p] = reason
        return hits, bad

    def put(self, rows: list[tuple[tuple[str, int, int], torch.Tensor]],
            bad: list[tuple[tuple[str, int, int], str]] = ()) -> None:
        """Store one batch atomically (a single transaction)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT OR REPLACE INTO emb VALUES (?, ?, ?, ?, ?)",
                [(k[0], k[1], k[2], int(e.numel()), e.detach().cpu().float().numpy().tobytes()) for k, e in rows])
            self.db.executemany("INSERT OR REPLACE INTO bad VALUES (?, ?, ?, ?)",
                                [(k[0], k[1], k[2], r) for k, r in bad])
            self.db.execute("DELETE FROM bad WHERE path IN (%s)" % ",".join("?" * len(rows)),
                            [k[0] for k, _ in rows]) if rows else None

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM emb").fetchone()[0]

    def close(self):
        self.db.close()
