"""The metadata database of an index (``INDEX/meta.sqlite``): its schema, the items (:class:`Item`)
and the generations that identify it, opening it (read-only, or read-write to roll back a killed
writer's transaction), and its SQLite errors as one line naming the file."""
from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from clipkit.core.errors import InputError
from clipkit.search.manifest import MANIFEST, META, REBUILD, Manifest, regular_file

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
