"""Build an index, and append to it (``clipkit index build`` / ``clipkit index add``).

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

Add: under the writer lock, drop entries whose file is gone, re-embed changed ones, embed new ones
into a new segment, encode it with the existing quantiser (retrained only when the data outgrew it,
``nprobe`` re-tuned when the items grew ``retune_growth`` times since the last tuning: see
:class:`~clipkit.search.ann.AnnConfig`), and commit by rewriting the manifest. The CLIP must be the
index's (spec, preprocessing, weights digest, width); an index of format 1 is upgraded in passing
(identity recorded, its SQfp16 codes files replaced by list numbers).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipkit.core.errors import ImageLoadError, InputError
from clipkit.core.io import DEFAULT_MAX_PIXELS
from clipkit.search import ann
from clipkit.search.sources import FileEntry, Sources, expand_sources, iter_shard
from clipkit.search.store import (ALIVE, VERSION, Item, Manifest, NpyAppender, Segment, canonical_spec,
                                  check_identity, check_scorer, check_unit, insert_items, load_rows, locked,
                                  meta_errors, new_index_id, now, open_meta, read_manifest, read_quantizer,
                                  record_generation, recover, write_manifest)

log = logging.getLogger(__name__)

TUNE_QUERIES = 500               # held-out vectors the nprobe tuning measures recall@10 on
CHUNK = 512                      # shard samples looked up in the cache / decoded per step


@dataclass
class IndexResult:
    index: str
    generation: int
    items: int                                        # searchable items now
    added: int = 0                                    # rows embedded by this run (new + re-embedded)
    removed: int = 0                                  # entries dropped (file gone or changed)
    reembedded: int = 0                               # changed files embedded again
    cached: int = 0                                   # embeddings that came from the cache
    skipped: list[dict] = field(default_factory=list)  # [{path, reason}]
    structure: str = ""                               # FAISS factory string, e.g. IVF1024,SQfp16
    nprobe: int = 1
    recall: float | None = None                       # tuned recall@10 (None: not re-measured)
    retrained: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VectorSource:
    """Bare vectors instead of images (benchmarks, tests, embeddings made elsewhere)."""
    vectors: np.ndarray                               # [N, D], L2-normalised
    names: Sequence[str] | None = None                # display paths (default: vec-<row>)
    captions: Sequence[str | None] | None = None


@dataclass
class _NewRows:
    segment: Segment | None
    items: list[Item]
    skipped: list[dict]
    cached: int = 0


def _digest(data: bytes) -> int:
    """A 56-bit content hash (fits SQLite's INTEGER): the cache key of a shard member."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def _decode_member(args):
    """Pool worker: (bytes, name, preprocess, timeout, max_pixels) -> (tensor, None) | (None, (reason, permanent))."""
    from clipkit.core.io import load_image_bytes
    from clipkit.core.preprocess import pil_to_tensor
    data, name, cfg, timeout_s, max_pixels = args
    try:
        return pil_to_tensor(load_image_bytes(data, name, timeout_s=timeout_s, max_pixels=max_pixels), cfg), None
    except ImageLoadError as e:
        return None, (e.reason, e.permanent)
    except Exception as e:  # any decoder failure: reported, not fatal
        return None, (f"{type(e).__name__}: {e}", False)


class _Embedder:
    """Embeds sources into one new segment file (fp16 rows) with their metadata items."""

    def __init__(self, scorer, cache, batch_size: int, num_workers: int, timeout_s: float | None,
                 progress: Callable | None):
        self.scorer, self.cache, self.batch_size = scorer, cache, batch_size
        self.num_workers, self.timeout_s, self.progress = num_workers, timeout_s, progress

    def dim(self) -> int:
        return int(self.scorer.encode_texts(["a"]).shape[-1])

    def run(self, folder: Path, src: Sources, start: int, seg_no: int) -> _NewRows:
        dim = self.dim()
        name = f"emb-{seg_no:06d}.npy"
        out = NpyAppender(folder / name, np.float16, dim)
        new = _NewRows(None, [], list(src.skipped))
        try:
            self._files(folder, src.files, out, start, new, dim)
            self._shards(src.shards, out, start, new)
        finally:
            rows = out.close()
        if rows == 0:
            os.unlink(folder / name)
            return new
        new.segment = Segment(name, "", start, rows, emb_sha256=out.sha256)
        return new

    # -- files: core's embedding stream + cache ---------------------------------------------------
    def _files(self, folder: Path, files: list[FileEntry], out: NpyAppender, start: int, new: _NewRows, dim: int):
        from clipkit.core.embedding import EmbeddingStream
        ok: list[tuple[FileEntry, str, int, int]] = []
        for e in files:
            try:
                st = os.stat(e.path)                       # stat before decoding: a later change is seen by `add`
                ok.append((e, os.path.realpath(e.path), st.st_size, st.st_mtime_ns))
            except OSError as err:
                new.skipped.append({"path": e.path, "reason": "no such file" if isinstance(err, FileNotFoundError)
                                    else (err.strerror or str(err))})
        if not ok:
            return
        stream = EmbeddingStream([e.path for e, *_ in ok], self.scorer, cache=self.cache,
                                 batch_size=self.batch_size, num_workers=self.num_workers,
                                 timeout_s=self.timeout_s, progress=self.progress)
        work_path = folder / f".work-{os.getpid()}.tmp"
        work = np.lib.format.open_memmap(work_path, mode="w+", dtype=np.float16, shape=(len(ok), dim))
        try:
            have = np.zeros(len(ok), dtype=bool)
            for chunk in stream:                      # cache hits first, then encoded batches
                idx = chunk.index.numpy()
                work[idx] = chunk.embeddings.detach().float().cpu().numpy()
                have[idx] = True
            for a, b in ann.batches(len(ok), 65536):  # kept rows, in path order
                keep = np.nonzero(have[a:b])[0]
                out.append(work[a:b][keep])
                for j in keep:
                    e, real, size, mtime = ok[a + j]
                    new.items.append(Item(start + len(new.items), e.path, real, size, mtime, e.caption))
        finally:
            del work
            work_path.unlink(missing_ok=True)
        new.skipped += stream.skipped_list()
        new.cached += stream.cached

    # -- tar shards: webdataset iteration, the same cache, decoding in a process pool --------------
    def _shards(self, shards: list[str], out: NpyAppender, start: int, new: _NewRows):
        if not shards:
            return
        import multiprocessing as mp
        pool = mp.get_context().Pool(self.num_workers) if self.num_workers > 0 else None
        try:
            for shard in shards:
                try:
                    st = os.stat(shard)
                except OSError as e:
                    new.skipped.append({"path": shard, "reason": e.strerror or str(e)})
                    continue
                real = os.path.realpath(shard)
                batch = []
                samples = iter_shard(shard)
                if self.progress:
                    samples = self.progress(samples, None)
                for s in samples:
                    if s.data is None:
                        new.skipped.append({"path": s.path, "reason": s.reason})
                        continue
                    batch.append(s)
                    if len(batch) == CHUNK:
                        self._shard_chunk(batch, shard, real, st, out, start, new, pool)
                        batch = []
                if batch:
                    self._shard_chunk(batch, shard, real, st, out, start, new, pool)
        finally:
            if pool is not None:
                pool.close()
                pool.join()

    def _shard_chunk(self, batch, shard, real, st, out, start, new, pool):
        import torch
        keys = [(f"{real}#{s.member}", len(s.data), _digest(s.data)) for s in batch]
        vec: list = [None] * len(batch)
        bad: dict[int, str] = {}
        if self.cache is not None:
            found = self.cache.lookup(keys)
            for j, n in enumerate(found.hits):
                vec[n] = found.vectors[j]
            bad.update(found.bad)
            new.cached += len(found.hits)
        todo = [n for n in range(len(batch)) if vec[n] is None and n not in bad]
        args = [(batch[n].data, batch[n].path, self.scorer.preprocess, self.timeout_s, DEFAULT_MAX_PIXELS)
                for n in todo]
        decoded = pool.imap(_decode_member, args, chunksize=8) if pool is not None else map(_decode_member, args)
        px, px_pos, bad_keys = [], [], []
        for n, (t, why) in zip(todo, decoded):
            if t is None:
                bad[n] = why[0]
                if why[1]:
                    bad_keys.append((keys[n], why[0]))
            else:
                px.append(t)
                px_pos.append(n)
        for a in range(0, len(px), self.batch_size):
            pos = px_pos[a:a + self.batch_size]
            emb = self.scorer.encode_pixel_batch(torch.stack(px[a:a + self.batch_size]))
            if self.cache is not None:
                self.cache.put([keys[n] for n in pos], emb, bad_keys if a == 0 else ())
            for n, e in zip(pos, emb.float().cpu().numpy()):
                vec[n] = e
        if not px and bad_keys and self.cache is not None:
            self.cache.put([], None, bad_keys)
        for n, s in enumerate(batch):
            if n in bad:
                new.skipped.append({"path": s.path, "reason": bad[n]})
                log.warning("skipped %s: %s", s.path, bad[n])
                continue
            out.append(np.asarray(vec[n], dtype=np.float32)[None])
            new.items.append(Item(start + len(new.items), s.path, real, st.st_size, st.st_mtime_ns, s.caption,
                                  shard, s.member))


def _vector_rows(folder: Path, vs: VectorSource, start: int, seg_no: int, dim: int) -> _NewRows:
    v = np.asarray(vs.vectors)
    if v.ndim != 2 or v.shape[1] != dim:
        raise InputError(f"vectors of shape {tuple(v.shape)}; the index holds {dim}-d vectors")
    if not np.isfinite(v).all():
        raise InputError("vectors contain NaN or infinity")
    if not len(v):
        raise InputError("no vectors given")
    names = list(vs.names) if vs.names is not None else [f"vec-{start + i:09d}" for i in range(len(v))]
    caps = list(vs.captions) if vs.captions is not None else [None] * len(v)
    if len(names) != len(v) or len(caps) != len(v):
        raise InputError(f"{len(v)} vectors but {len(names)} names and {len(caps)} captions")
    name = f"emb-{seg_no:06d}.npy"
    out = NpyAppender(folder / name, np.float16, dim)
    for a, b in ann.batches(len(v), 65536):
        x = np.asarray(v[a:b], dtype=np.float32)
        norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None].astype(np.float32)
        if not (norm > 1e-6).all() or not np.isfinite(norm).all():
            raise InputError(f"vector {a + int(np.argmin((norm > 1e-6) & np.isfinite(norm)))} has no direction "
                             "(zero or overflowing norm)")
        out.append(x / norm)                                # stored as unit vectors, as image embeddings are
    out.close()
    items = [Item(start + i, n, "", 0, 0, c) for i, (n, c) in enumerate(zip(names, caps))]
    return _NewRows(Segment(name, "", start, len(v), emb_sha256=out.sha256), items, [])


# ---- the ANN: train or extend, encode, tune ------------------------------------------------------

def _outgrown(plan: ann.AnnPlan, n: int, cfg: ann.AnnConfig) -> str | None:
    """Why the quantiser must be retrained for ``n`` vectors (None: it still fits)."""
    if plan.kind == "flat" and n > cfg.flat_max:
        return f"{n} vectors exceed the exact-scan limit ({cfg.flat_max})"
    if plan.kind == "ivf" and n > cfg.retrain_growth * plan.n:
        return f"{n} vectors outgrew the quantiser trained on {plan.n} (x{cfg.retrain_growth:g})"
    if cfg.max_memory is not None and ann.estimate_memory(n, plan.dim, plan.codec, plan.nlist) > cfg.max_memory:
        return "the memory budget no longer fits"
    if cfg.codec and cfg.codec != plan.codec:
        return f"codec changed to {cfg.codec}"
    return None


def _rows(folder: Path, seg: Segment, dim: int):
    return load_rows(folder / seg.emb, np.float16, seg.rows, dim)


def _update_ann(folder: Path, m: Manifest, cfg: ann.AnnConfig, mask: np.ndarray, gen: int,
                new_segments: list[Segment]) -> tuple[bool, float | None]:
    """Give every segment codes under a quantiser that fits ``m.alive`` items, and ``nprobe`` a value
    tuned on held-out vectors; -> (retrained, recall measured now or None)."""
    from clipkit.core.outputs import write_bytes_atomic
    old = ann.AnnPlan.from_dict(m.ann) if m.ann else None
    why = "first build" if old is None else _outgrown(old, m.alive, cfg)
    rng = np.random.default_rng(cfg.seed)
    if why is None:                                   # encode only the new rows, with the current quantiser
        index = read_quantizer(folder, m)             # (records the quantiser's sha256 if format 1 had none)
        for seg in new_segments:
            _encode_segment(folder, index, seg, gen, m.dim)
        sqfp16 = ann.is_sqfp16(ann.extract_ivf(index))
        for seg in m.segments:                        # format 1: SQfp16 codes -> list numbers (one copy)
            if sqfp16 and not seg.lists_only:
                _lists_from_codes(folder, index, seg, gen)
        tuned_n = m.ann.get("tuned_n", old.n)
        if old.nlist == 1 or m.alive < cfg.retune_growth * tuned_n:
            return False, None
        log.info("re-tuning nprobe (%d items, tuned at %d)", m.alive, tuned_n)
        held = np.nonzero(mask)[0]
        new_ids = held[held >= m.ann.get("trained_rows", 0)]        # rows added since training: held out
        nprobe, recall = _tune(folder, m, index, mask, cfg, rng, new_ids if len(new_ids) >= 50 else held)
        m.ann.update(nprobe=nprobe, recall=round(recall, 4), tuned_n=m.alive, tuned_on="held-out vectors")
        return False, recall
    log.info("training the ANN structure (%s)", why)
    plan = ann.plan_index(m.alive, m.dim, cfg)
    alive_ids = np.nonzero(mask)[0]
    sample = np.sort(rng.choice(alive_ids, size=min(len(alive_ids), ann.train_sample_size(plan)), replace=False))
    index = ann.train(plan, _gather(folder, m.segments, sample, m.dim), cfg.seed)
    quantizer = f"ivf-g{gen}.faiss"
    data = ann.serialize(index)
    write_bytes_atomic(folder / quantizer, data, overwrite=True)
    for seg in m.segments:
        _encode_segment(folder, index, seg, gen, m.dim)
    m.ann = {**plan.to_dict(), "quantizer": quantizer, "quantizer_sha256": hashlib.sha256(data).hexdigest(),
             "nprobe": 1, "recall": 1.0, "trained_generation": gen, "trained_rows": m.rows, "reason": why,
             "tuned_n": m.alive, "tuned_on": "exact scan"}
    if plan.nlist > 1:
        # tune on vectors the k-means never saw: a training vector sits closer to its centroid than a
        # new query does, and tuning on those promises more recall than users get
        held = np.setdiff1d(alive_ids, sample, assume_unique=True)
        enough = len(held) >= min(50, len(alive_ids))
        nprobe, recall = _tune(folder, m, index, mask, cfg, rng, held if enough else alive_ids)
        m.ann.update(nprobe=nprobe, recall=round(recall, 4),
                     tuned_on="held-out vectors" if enough else "index vectors (all in the training sample)")
    return True, m.ann["recall"]


def _tune(folder: Path, m: Manifest, index, mask: np.ndarray, cfg: ann.AnnConfig, rng,
          pool: np.ndarray) -> tuple[int, float]:
    """nprobe reaching ``cfg.target_recall`` recall@10 against an exact scan, measured with up to
    TUNE_QUERIES vectors of ``pool`` as queries (their own id excluded from both sides)."""
    full = ann.deserialize(ann.serialize(index))
    ann.assemble(full, _segment_codes(folder, m, mask))
    qids = np.sort(rng.choice(pool, size=min(len(pool), TUNE_QUERIES), replace=False))
    q = _gather(folder, m.segments, qids, m.dim)
    k = min(10, int(mask.sum()) - 1)
    truth = ann.exact_topk(_iter(folder, m.segments, mask, m.dim), q, k + 1)
    t = ann.tune_nprobe(full, q, truth, cfg.target_recall, k=k, self_ids=qids)
    return t.nprobe, t.recall


def _segment_codes(folder: Path, m: Manifest, mask: np.ndarray) -> list[ann.SegmentCodes]:
    return [ann.SegmentCodes(load_rows(folder / s.codes, np.uint8, s.rows),
                             _rows(folder, s, m.dim) if s.lists_only else None, s.start,
                             mask[s.start:s.start + s.rows], str(folder / s.codes), str(folder / s.emb))
            for s in m.segments]


def _gather(folder: Path, segments: list[Segment], ids: np.ndarray, dim: int) -> np.ndarray:
    out = np.empty((len(ids), dim), dtype=np.float32)
    starts = np.array([s.start for s in segments])
    seg = np.searchsorted(starts, ids, side="right") - 1
    for s in np.unique(seg):
        sel = np.nonzero(seg == s)[0]
        rows = ids[sel] - segments[s].start
        out[sel] = check_unit(np.asarray(_rows(folder, segments[s], dim)[rows], dtype=np.float32),
                              folder / segments[s].emb, rows)
    return out


def _iter(folder: Path, segments: list[Segment], mask: np.ndarray, dim: int, chunk: int = 65536):
    for seg in segments:
        emb = _rows(folder, seg, dim)
        for a, b in ann.batches(seg.rows, chunk):
            keep = np.nonzero(mask[seg.start + a:seg.start + b])[0]
            if len(keep):
                yield keep + seg.start + a, check_unit(np.asarray(emb[a:b][keep], dtype=np.float32),
                                                       folder / seg.emb, keep + a)


def _encode_segment(folder: Path, index, seg: Segment, gen: int, dim: int) -> None:
    """Write ``seg``'s codes under ``index``: with SQfp16 only the list numbers (``lists-*``; the body
    of each code is the fp16 row), else FAISS standalone codes (``codes-*``)."""
    ivf = ann.extract_ivf(index)
    ccs = ivf.coarse_code_size()
    lists_only = ann.is_sqfp16(ivf)
    name = f"{'lists' if lists_only else 'codes'}-{int(seg.emb[4:10]):06d}-g{gen}.npy"
    emb = _rows(folder, seg, dim)
    out = NpyAppender(folder / name, np.uint8, ccs if lists_only else index.sa_code_size())
    for a, b in ann.batches(seg.rows, 65536):
        x = check_unit(np.asarray(emb[a:b], dtype=np.float32), folder / seg.emb, a)
        if lists_only and ccs == 0:
            out.append(np.zeros((b - a, 0), np.uint8))
        else:
            codes = ann.encode(index, x)
            out.append(codes[:, :ccs] if lists_only else codes)
    out.close()
    seg.codes, seg.codes_sha256 = name, out.sha256


def _lists_from_codes(folder: Path, index, seg: Segment, gen: int) -> None:
    """A format-1 segment's SQfp16 codes file -> its list numbers (the bodies are its fp16 rows)."""
    ccs = ann.extract_ivf(index).coarse_code_size()
    codes = load_rows(folder / seg.codes, np.uint8, seg.rows, index.sa_code_size())
    name = f"lists-{int(seg.emb[4:10]):06d}-g{gen}.npy"
    out = NpyAppender(folder / name, np.uint8, ccs)
    for a, b in ann.batches(seg.rows, 262144):
        out.append(np.asarray(codes[a:b, :ccs]))
    out.close()
    seg.codes, seg.codes_sha256 = name, out.sha256


# ---- build --------------------------------------------------------------------------------------

def check_index_output(out, sources: Sequence = (), overwrite: bool = False) -> Path:
    """Validate an index folder to create before any work: not an input, not inside an input's
    place, an existing folder only with ``overwrite`` and only if it is an index (never a user's
    folder of other things)."""
    from clipkit.search.store import MANIFEST
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
                emb = _Embedder(scorer, cache, batch_size, num_workers, timeout_s, progress)
                new = emb.run(tmp, srcs, 0, 1)
                dim = emb.dim()
                if new.segment is None:
                    raise InputError(f"none of the {len(srcs.files)} files and {len(srcs.shards)} shards "
                                     "gave a readable image")
            else:
                dim = int(np.asarray(vectors.vectors).shape[1]) if np.asarray(vectors.vectors).ndim == 2 else 0
                if not len(vectors.vectors):
                    raise InputError("no vectors given")
                new = _vector_rows(tmp, vectors, 0, 1, dim)
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
            _, recall = _update_ann(tmp, m, cfg, mask, 1, [m.segments[0]])
            write_manifest(tmp, m)
        finally:
            db.close()
    return IndexResult(str(out), 1, m.alive, added=m.alive, cached=new.cached, skipped=new.skipped,
                       structure=m.ann["factory"], nprobe=m.ann["nprobe"], recall=recall, retrained=True,
                       seconds=time.perf_counter() - t0)


# ---- add ----------------------------------------------------------------------------------------

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
                _rows(folder, seg, m.dim)
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
                emb = _Embedder(scorer, cache, batch_size, num_workers, timeout_s, progress)
                new = emb.run(folder, Sources(files, shards, srcs.skipped), m.rows, len(m.segments) + 1)
            else:
                new = _vector_rows(folder, vectors, m.rows, len(m.segments) + 1, m.dim)
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
            retrained, recall = _update_ann(folder, m, cfg, mask, gen, new_segments)
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
