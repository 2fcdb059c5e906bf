"""Streaming, error-tolerant embedding of image files (shared by rerank, search and ``clipkit embed``).

Files are decoded, resized and batched in DataLoader worker processes (opt-in on a CPU: the workers
also encode their batches, ``EmbeddingStream(workers_encode=True)``); a file that fails (empty,
truncated, not an image, a decompression bomb, unreadable, or slower to decode than ``timeout_s``)
comes back as a reason instead of a tensor and is reported, never fatal. :class:`EmbeddingStream`
hands over cache hits in chunks, then each encoded batch (written to the cache as it finishes), and
keeps nothing per file, so memory stays bounded by the chunk whatever the folder size, and an
interrupted run resumes from the cache.
"""
from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipkit.core.cache import file_key
from clipkit.core.errors import ImageLoadError
from clipkit.core.io import DEFAULT_MAX_PIXELS, load_image
from clipkit.core.preprocess import PreprocessConfig, pil_to_tensor

log = logging.getLogger(__name__)


def load_with_timeout(path, cfg: PreprocessConfig, timeout_s: float | None, max_pixels: int | None):
    """Decode (time-bound, regular files only) + preprocess one file."""
    return pil_to_tensor(load_image(path, max_pixels=max_pixels, timeout_s=timeout_s), cfg)


def _unreadable(e: OSError) -> str:
    return "no such file" if isinstance(e, FileNotFoundError) else (e.strerror or str(e))


class _Files(Dataset):
    """Item j: decode ``paths[todo[j]]``; -> (index, cache key or None, pixels or None, reason or None).

    The key is None for a failure that is not a property of the file's bytes (a timeout, a
    permission, a FIFO): those are never remembered by the cache, so the next run retries them."""

    def __init__(self, paths, todo: np.ndarray, cfg, timeout_s, max_pixels, with_keys: bool):
        self.paths, self.todo, self.cfg = paths, todo, cfg        # paths by reference: no per-worker copy
        self.timeout_s, self.max_pixels, self.with_keys = timeout_s, max_pixels, with_keys

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        i = int(self.todo[j])
        path = Path(self.paths[i])
        try:
            key = file_key(path) if self.with_keys else None    # stat before decoding: a later change is a miss
        except OSError as e:
            return i, None, None, _unreadable(e)
        try:
            return i, key, load_with_timeout(path, self.cfg, self.timeout_s, self.max_pixels), None
        except ImageLoadError as e:
            return i, key if e.permanent else None, None, e.reason
        except Exception as e:  # anything else a decoder can throw: reported, not fatal, retried
            return i, None, None, f"{type(e).__name__}: {e}"


@dataclass
class _Batch:
    index: list[int]                            # input positions of the decoded files
    keys: list                                  # their cache keys (None without a cache)
    pixels: torch.Tensor | None                 # [B, 3, S, S], stacked in the worker (one shared tensor)
    bad: list[tuple[int, object, str]]          # (position, key or None, reason)
    embeddings: torch.Tensor | None = None      # [B, D] when the worker also encoded the batch


def _collate(items) -> _Batch:
    good = [it for it in items if it[2] is not None]
    return _Batch([it[0] for it in good], [it[1] for it in good],
                  torch.stack([it[2] for it in good]) if good else None,
                  [(i, k, r) for i, k, x, r in items if x is None])


class _CollateAndEncode:
    """collate_fn that also encodes the batch, in the worker. On a CPU, N single-threaded workers
    that each decode *and* encode keep every core on useful work, where one multi-threaded forward
    beside decode workers scales poorly (bench/rerank.py --parts breakdown: on 2 cores, 2 torch
    threads make the forward 1.18x faster for 1.7x the CPU time)."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, items) -> _Batch:
        batch = _collate(items)
        if batch.pixels is not None:
            batch.embeddings = self.scorer.encode_pixel_batch(batch.pixels).clone()
            batch.pixels = None
        return batch


def encode_in_workers(scorer, num_workers: int) -> bool:
    """Whether DataLoader workers can encode too: CPU scorers with forked workers (the model is
    shared copy-on-write; with spawn it would be pickled into every worker)."""
    import multiprocessing as mp
    return num_workers > 0 and scorer.device.type == "cpu" and mp.get_start_method(allow_none=False) == "fork"


@dataclass
class EmbeddedChunk:
    index: torch.Tensor         # [B] int64: positions in the input list
    embeddings: torch.Tensor    # [B, D] unit norm (CPU fp32 from the cache, the scorer's device when encoded)


#: Files looked up in the cache per query (and rows per cached chunk).
CACHE_CHUNK = 512


class EmbeddingStream:
    """Iterate over the embeddings of image files in chunks, cache hits first, then encoded batches.

    Nothing per file is kept beyond the input list and an int64 index of the files to encode: each
    chunk is handed over and forgotten, so memory is bounded by the chunk whatever the folder size.
    After iteration, ``skipped`` maps input positions to reasons and ``cached`` counts cache hits.
    """

    def __init__(self, paths: Sequence, scorer, cache=None, batch_size: int = 64, num_workers: int = 0,
                 timeout_s: float | None = 30.0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 progress: Callable | None = None, workers_encode: bool = False):
        self.paths = paths if isinstance(paths, list) else list(paths)
        self.scorer, self.cache, self.batch_size, self.num_workers = scorer, cache, batch_size, num_workers
        self.timeout_s, self.max_pixels, self.progress = timeout_s, max_pixels, progress
        self.skipped: dict[int, str] = {}
        self.cached = 0
        # opt-in: workers also encode (CPU + fork only; BENCHMARKS.md: +7-15% images/s on 2 cores, but
        # the largest worker's peak RSS grew 630 -> 941 MB from 2k to 20k images, not yet explained)
        self.workers_encode = workers_encode

    def __iter__(self) -> Iterator[EmbeddedChunk]:
        todo = array("q")
        yield from self._from_cache(todo)
        if todo:
            yield from self._encode(np.frombuffer(todo, dtype=np.int64))

    def _from_cache(self, todo: array) -> Iterator[EmbeddedChunk]:
        """1. stat every file (missing ones are skipped); 2. look chunks up in the cache; the rest -> todo."""
        for start in range(0, len(self.paths), CACHE_CHUNK):
            pos, keys = [], []
            for i in range(start, min(start + CACHE_CHUNK, len(self.paths))):
                try:
                    keys.append(file_key(self.paths[i]))
                    pos.append(i)
                except OSError as e:
                    self.skipped[i] = _unreadable(e)
            if self.cache is None or not keys:
                todo.extend(pos)
                continue
            found = self.cache.lookup(keys)
            for n, reason in found.bad.items():
                self.skipped[pos[n]] = reason
            done = set(found.hits).union(found.bad)
            todo.extend(i for n, i in enumerate(pos) if n not in done)
            if found.hits:
                self.cached += len(found.hits)
                yield EmbeddedChunk(torch.tensor([pos[n] for n in found.hits], dtype=torch.int64),
                                    torch.from_numpy(found.vectors))

    def _encode(self, todo: np.ndarray) -> Iterator[EmbeddedChunk]:
        """3. decode in DataLoader workers, encode each batch, write it to the cache, hand it over."""
        ds = _Files(self.paths, todo, self.scorer.preprocess, self.timeout_s, self.max_pixels,
                    with_keys=self.cache is not None)
        in_workers = self.workers_encode and encode_in_workers(self.scorer, self.num_workers)
        collate = _CollateAndEncode(self.scorer) if in_workers else _collate
        loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
                            shuffle=False, persistent_workers=False)
        for batch in (self.progress(loader, total=len(loader)) if self.progress else loader):
            for i, _, r in batch.bad:
                self.skipped[i] = r
                log.warning("skipped %s: %s", self.paths[i], r)
            emb = batch.embeddings
            if emb is None and batch.pixels is not None:
                emb = self.scorer.encode_pixel_batch(batch.pixels)
            if self.cache is not None:
                self.cache.put(batch.keys, emb, [(k, r) for _, k, r in batch.bad if k is not None])
            if emb is not None:
                yield EmbeddedChunk(torch.tensor(batch.index, dtype=torch.int64), emb)

    def name(self, i: int) -> str:
        return str(Path(self.paths[i]))

    def skipped_list(self) -> list[dict]:
        return [{"path": self.name(i), "reason": r} for i, r in sorted(self.skipped.items())]


@dataclass
class EmbedResult:
    paths: list[str]                                   # embedded files, input order
    embeddings: torch.Tensor                           # [N, D] fp32, unit norm
    skipped: list[dict] = field(default_factory=list)  # [{path, reason}]
    cached: int = 0                                    # how many came from the cache


def embed_files(paths: Sequence, scorer, cache=None, batch_size: int = 64, num_workers: int = 0,
                timeout_s: float | None = 30.0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                progress: Callable | None = None) -> EmbedResult:
    """Embed image files (streaming; cache-aware) into one [N, D] matrix, in the order of ``paths``."""
    stream = EmbeddingStream(paths, scorer, cache, batch_size, num_workers, timeout_s, max_pixels, progress)
    out, have = None, torch.zeros(len(stream.paths), dtype=torch.bool)
    for chunk in stream:
        e = chunk.embeddings.detach().to("cpu", torch.float32)
        if out is None:                                # one allocation, filled in place
            out = torch.empty(len(stream.paths), e.shape[1])
        out[chunk.index] = e
        have[chunk.index] = True
    keep = have.nonzero().flatten()
    emb = torch.zeros(0, 0) if out is None else out if len(keep) == len(out) else out[keep]
    return EmbedResult([stream.name(i) for i in keep.tolist()], emb, stream.skipped_list(), stream.cached)
