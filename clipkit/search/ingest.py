"""The rows of a new segment, for ``index build`` and ``index add`` alike: image files through core's
:class:`~clipkit.core.embedding.EmbeddingStream` (decode in DataLoader workers, the embedding cache
read first and written per batch), tar shard members through the same cache with a process pool for
decoding, or bare vectors (:class:`VectorSource`); written as fp16 in a stable order (files in path
order, then shard samples in tar order) with their metadata items, unreadable inputs listed under
``skipped``. Also :class:`IndexResult`, what a build or an add reports."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipkit.core.errors import ImageLoadError, InputError
from clipkit.core.io import DEFAULT_MAX_PIXELS
from clipkit.search import ann
from clipkit.search.manifest import Segment
from clipkit.search.meta import Item
from clipkit.search.segments import NpyAppender
from clipkit.search.sources import FileEntry, Sources, iter_shard

log = logging.getLogger(__name__)

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


class Embedder:
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


def vector_rows(folder: Path, vs: VectorSource, start: int, seg_no: int, dim: int) -> _NewRows:
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
