"""Build an index (``clipkit index build``).

Build, numbered as it runs:

1. expand the sources (folders, file lists, tar shards) and stat every file;
2. embed: files through core's :class:`~clipkit.core.embedding.EmbeddingStream` (decode in
   DataLoader workers, the embedding cache read first and written per batch, so an interrupted
   build resumes where it stopped), shard members through the same cache with a process pool for
   decoding; rows are written as fp16 in a stable order (files in path order, then shard samples
   in tar order), unreadable inputs are listed under ``skipped``;
3. plan the ANN under the memory budget, train the coarse quantiser on a sample, encode every row
   (SQfp16: only its list number; the code body is the fp16 row itself), tune ``nprobe`` to the
   target recall against an exact scan, on held-out vectors (not in the training sample);
4. write the manifest last; the whole folder is built beside the target and renamed into place
   (:func:`clipkit.core.outputs.atomic_dir`): a killed build leaves the previous index or none.

Appending to an index is :mod:`clipkit.search.add`; the rows of a segment come from
:mod:`clipkit.search.ingest`, the ANN's training, encoding and tuning from :mod:`clipkit.search.tuning`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipkit.core.errors import InputError
from clipkit.search import ann
from clipkit.search.ingest import Embedder, IndexResult, VectorSource, vector_rows
from clipkit.search.manifest import MANIFEST, Manifest, canonical_spec, new_index_id, now, write_manifest
from clipkit.search.meta import insert_items, open_meta, record_generation
from clipkit.search.sources import Sources, expand_sources
from clipkit.search.tuning import update_ann


def check_index_output(out, sources: Sequence = (), overwrite: bool = False) -> Path:
    """Validate an index folder to create before any work: not an input, not inside an input's
    place, an existing folder only with ``overwrite`` and only if it is an index (never a user's
    folder of other things)."""
    p = Path(out)
    if p.name in ("", ".", ".."):
        raise InputError(f"--out {out!r} is not a folder name")
    real = os.path.realpath(p)
    for s in sources:
        rs = os.path.realpath(str(s))
        if real == rs or rs.startswith(real.rstrip(os.sep) + os.sep):
            raise InputError(f"--out {p} is (or contains) the source {s}: choose another folder")
    if os.path.lexists(p):
        if not overwrite:
            raise InputError(f"refusing to overwrite {p}: pass --overwrite or choose another folder")
        if os.path.islink(p) or not p.is_dir():
            raise InputError(f"--out {p} exists and is not an index folder")
        if any(True for _ in os.scandir(p)) and not (p / MANIFEST).is_file():
            raise InputError(f"--out {p} is a folder that is not a clipkit index: refusing to replace it")
    parent = Path(os.path.realpath(p.parent if str(p.parent) else "."))
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write --out {p}: folder {parent} is not writable")
    return p


def build_index(sources, out, scorer=None, *, config: ann.AnnConfig | None = None, cache=None,
                batch_size: int = 64, num_workers: int = 0, timeout_s: float | None = 30.0,
                overwrite: bool = False, progress: Callable | None = None,
                vectors: VectorSource | None = None, model: str | None = None,
                preprocess: dict | None = None, expanded: Sources | None = None) -> IndexResult:
    """Build an index at ``out`` from image ``sources`` (embedded with ``scorer``), or from
    ``vectors`` (then ``model``/``preprocess`` name where they came from). ``expanded``: the
    sources already listed by :func:`~clipkit.search.sources.expand_sources` (not listed again)."""
    from clipkit.core.outputs import atomic_dir
    t0 = time.perf_counter()
    cfg = (config or ann.AnnConfig()).validate()
    if vectors is None:
        if scorer is None:
            raise InputError("build_index needs a scorer (or vectors)")
        srcs = expanded if expanded is not None else expand_sources(sources)
        check_index_output(out, [*(str(s) for s in sources)], overwrite)
        if not srcs.files and not srcs.shards:
            raise InputError("no image files or shards found in the sources")
        model, preprocess = scorer.spec, scorer.preprocess.to_dict()
        weights, precision = scorer.weights_digest, getattr(scorer, "precision", "")
    else:
        weights = precision = ""
        check_index_output(out, (), overwrite)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        db = open_meta(tmp, writable=True)
        try:
            if vectors is None:
                emb = Embedder(scorer, cache, batch_size, num_workers, timeout_s, progress)
                new = emb.run(tmp, srcs, 0, 1)
                dim = emb.dim()
                if new.segment is None:
                    raise InputError(f"none of the {len(srcs.files)} files and {len(srcs.shards)} shards "
                                     "gave a readable image")
            else:
                dim = int(np.asarray(vectors.vectors).shape[1]) if np.asarray(vectors.vectors).ndim == 2 else 0
                if not len(vectors.vectors):
                    raise InputError("no vectors given")
                new = vector_rows(tmp, vectors, 0, 1, dim)
            m = Manifest(model=canonical_spec(model) if model else "vectors", preprocess=preprocess or {}, dim=dim,
                         ann={}, config=asdict(cfg), segments=[new.segment], generation=1, rows=new.segment.rows,
                         alive=new.segment.rows, created=now(), index_id=new_index_id(), weights=weights,
                         precision=precision, sources=[os.path.abspath(str(s)) for s in (sources or [])])
            with db:
                db.execute("BEGIN IMMEDIATE")
                insert_items(db, new.items, 1)
                record_generation(db, m)
                db.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?, 1)",
                               [(s["path"], s["reason"]) for s in new.skipped])
            mask = np.ones(m.rows, dtype=bool)
            _, recall = update_ann(tmp, m, cfg, mask, 1, [m.segments[0]])
            write_manifest(tmp, m)
        finally:
            db.close()
    return IndexResult(str(out), 1, m.alive, added=m.alive, cached=new.cached, skipped=new.skipped,
                       structure=m.ann["factory"], nprobe=m.ann["nprobe"], recall=recall, retrained=True,
                       seconds=time.perf_counter() - t0)
