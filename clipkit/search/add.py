"""Append to an index (``clipkit index add``).

Under the writer lock, drop entries whose file is gone, re-embed changed ones, embed new ones
into a new segment, encode it with the existing quantiser (retrained only when the data outgrew it,
``nprobe`` re-tuned when the items grew ``retune_growth`` times since the last tuning: see
:class:`~clipkit.search.ann.AnnConfig`), and commit by rewriting the manifest. The CLIP must be the
index's (spec, preprocessing, weights digest, width); an index of format 1 is upgraded in passing
(identity recorded, its SQfp16 codes files replaced by list numbers).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from clipkit.core.errors import InputError
from clipkit.search import ann
from clipkit.search.ingest import Embedder, IndexResult, VectorSource, vector_rows
from clipkit.search.manifest import (VERSION, Manifest, canonical_spec, check_scorer, new_index_id, read_manifest,
                                     write_manifest)
from clipkit.search.meta import ALIVE, check_identity, insert_items, meta_errors, open_meta, record_generation
from clipkit.search.segments import load_rows, locked, recover
from clipkit.search.sources import FileEntry, Sources, expand_sources
from clipkit.search.tuning import emb_rows, update_ann


def _stale(db, m: Manifest) -> tuple[list[int], list[FileEntry], set[str]]:
    """Entries whose file is gone (dropped) or changed (dropped and re-embedded): -> (ids to drop,
    files to embed again, shards to read again)."""
    from clipkit.search.sources import sidecar_caption
    drop, again, shards = [], [], set()
    shard_state: dict[str, tuple | None] = {}
    g = m.generation
    cur = db.execute(f"SELECT id, path, real, size, mtime, shard FROM items WHERE {ALIVE} AND real != ''", (g, g))
    while True:
        rows = cur.fetchmany(10_000)
        if not rows:
            break
        for id_, path, real, size, mtime, shard in rows:
            if shard:
                if shard not in shard_state:
                    try:
                        st = os.stat(shard)
                        shard_state[shard] = (os.path.realpath(shard), st.st_size, st.st_mtime_ns)
                    except OSError:
                        shard_state[shard] = None
                now_ = shard_state[shard]
                if now_ != (real, size, mtime):
                    drop.append(id_)
                    if now_ is not None:
                        shards.add(shard)
                continue
            try:
                st = os.stat(path)
                cur_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
            except OSError:
                drop.append(id_)
                continue
            if cur_key != (real, size, mtime):
                drop.append(id_)
                again.append(FileEntry(path, sidecar_caption(Path(path))))
    return drop, again, shards


def _alive_paths(db, m: Manifest, paths: list[str], column: str = "path") -> set[str]:
    g = m.generation
    found = set()
    for a in range(0, len(paths), 500):
        part = paths[a:a + 500]
        q = ",".join("?" * len(part))
        found.update(r[0] for r in db.execute(
            f"SELECT DISTINCT {column} FROM items WHERE {column} IN ({q}) AND {ALIVE}", (*part, g, g)))
    return found


def add_to_index(index, sources=(), scorer=None, *, cache=None, batch_size: int = 64, num_workers: int = 0,
                 timeout_s: float | None = 30.0, max_memory: int | None = None, progress: Callable | None = None,
                 vectors: VectorSource | None = None, refresh: bool = True) -> IndexResult:
    """Append ``sources`` (or ``vectors``) to an index without rebuilding it. With ``refresh``, every
    indexed file is checked too: gone -> dropped, changed -> dropped and embedded again."""
    t0 = time.perf_counter()
    folder = Path(index)
    read_manifest(folder)                               # a clear error before taking the lock
    with locked(folder):
        db = open_meta(folder, writable=True)
        try:
            m = read_manifest(folder)
            recover(folder, m, db)
            check_identity(folder, m, db)
            for seg in m.segments:                  # headers and sizes: a damaged file fails before any work
                emb_rows(folder, seg, m.dim)
                load_rows(folder / seg.codes, np.uint8, seg.rows)
            if vectors is None:
                if scorer is None:
                    raise InputError("add_to_index needs a scorer (or vectors)")
                check_scorer(folder, m, scorer)
                width = int(scorer.encode_texts(["a"]).shape[-1])
                if width != m.dim:
                    raise InputError(f"CLIP {scorer.spec} gives {width}-d embeddings; index {folder} holds "
                                     f"{m.dim}-d ones (the model changed since it was built): rebuild the index")
                if not m.weights and m.version < VERSION:         # format 1: record what it is built with
                    m.model, m.weights, m.precision = canonical_spec(m.model), scorer.weights_digest, \
                        getattr(scorer, "precision", "")
            cfg = ann.AnnConfig.from_dict(m.config)
            if max_memory is not None:
                cfg.max_memory = max_memory
            cfg.validate()
            gen = m.generation + 1
            drop, again, reshards = _stale(db, m) if refresh and vectors is None else ([], [], set())
            if vectors is None:
                srcs = expand_sources(sources) if sources else Sources()
                dropped = set()
                if drop:
                    for a in range(0, len(drop), 500):
                        part = drop[a:a + 500]
                        dropped.update(r[0] for r in db.execute(
                            f"SELECT path FROM items WHERE id IN ({','.join('?' * len(part))})", part))
                present = _alive_paths(db, m, [e.path for e in srcs.files]) - dropped
                again_paths = {e.path for e in again}
                files = [e for e in srcs.files if e.path not in present and e.path not in again_paths] + again
                known_shards = _alive_paths(db, m, srcs.shards, "shard")
                shards = sorted(set(s for s in srcs.shards if s not in known_shards) | reshards)
                emb = Embedder(scorer, cache, batch_size, num_workers, timeout_s, progress)
                new = emb.run(folder, Sources(files, shards, srcs.skipped), m.rows, len(m.segments) + 1)
            else:
                new = vector_rows(folder, vectors, m.rows, len(m.segments) + 1, m.dim)
            added = len(new.items)
            if not added and not drop:
                return IndexResult(str(folder), m.generation, m.alive, skipped=new.skipped, cached=new.cached,
                                   structure=m.ann.get("factory", ""), nprobe=m.ann.get("nprobe", 1),
                                   seconds=time.perf_counter() - t0)
            new_segments = [new.segment] if new.segment is not None else []
            m.segments += new_segments
            m.rows += added
            m.alive = m.alive - len(drop) + added
            m.generation = gen
            m.index_id = m.index_id or new_index_id()
            m.version = VERSION
            with meta_errors(folder), db:
                db.execute("BEGIN IMMEDIATE")
                insert_items(db, new.items, gen)
                for a in range(0, len(drop), 500):
                    part = drop[a:a + 500]
                    db.execute(f"UPDATE items SET removed = ? WHERE id IN ({','.join('?' * len(part))})", (gen, *part))
                db.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?)",
                               [(s["path"], s["reason"], gen) for s in new.skipped])
                record_generation(db, m)
            m.config = asdict(cfg)
            m.sources = list(dict.fromkeys(m.sources + [os.path.abspath(str(s)) for s in sources or []]))
            mask = np.zeros(m.rows, dtype=bool)
            cur = db.execute(f"SELECT id FROM items WHERE {ALIVE}", (gen, gen))
            while True:
                rows = cur.fetchmany(100_000)
                if not rows:
                    break
                mask[[r[0] for r in rows]] = True
            if m.alive == 0:
                raise InputError("every item of the index is gone: build a new index instead")
            retrained, recall = update_ann(folder, m, cfg, mask, gen, new_segments)
            write_manifest(folder, m)                   # the commit point
            recover(folder, m, db)                      # files of the previous quantiser, if retrained
        finally:
            db.close()
    again_paths = {e.path for e in again}
    reemb = sum(1 for it in new.items if it.path in again_paths)
    return IndexResult(str(folder), gen, m.alive, added=added, removed=len(drop), reembedded=reemb,
                       cached=new.cached, skipped=new.skipped, structure=m.ann["factory"],
                       nprobe=m.ann["nprobe"], recall=recall, retrained=retrained,
                       seconds=time.perf_counter() - t0)
