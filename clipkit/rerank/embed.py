"""Streaming, error-tolerant embedding of image files.

Files are decoded and resized in DataLoader worker processes; a file that fails (empty, truncated,
not an image, a decompression bomb, unreadable, or slower to decode than ``timeout_s``) comes back
as a reason instead of a tensor and is reported, never fatal. Batches are encoded and written to the
cache as they finish, so memory stays bounded by the batch, whatever the folder size, and an
interrupted run resumes from the cache.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clipkit.core.errors import ImageLoadError
from clipkit.core.io import DEFAULT_MAX_PIXELS, load_image
from clipkit.core.preprocess import PreprocessConfig, pil_to_tensor

log = logging.getLogger(__name__)


class DecodeTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise DecodeTimeout()


def load_with_timeout(path, cfg: PreprocessConfig, timeout_s: float | None, max_pixels: int | None):
    """Decode + preprocess one file; a SIGALRM timer bounds the time (main thread of a process only)."""
    use_alarm = bool(timeout_s) and threading.current_thread() is threading.main_thread()
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return pil_to_tensor(load_image(path, max_pixels=max_pixels), cfg)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


class _Files(Dataset):
    def __init__(self, paths, cfg, timeout_s, max_pixels):
        self.paths, self.cfg, self.timeout_s, self.max_pixels = list(paths), cfg, timeout_s, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_with_timeout(self.paths[i], self.cfg, self.timeout_s, self.max_pixels), None
        except ImageLoadError as e:
            return i, None, e.reason
        except DecodeTimeout:
            return i, None, f"decoding took longer than {self.timeout_s:g}s"
        except Exception as e:  # anything else a decoder can throw: reported, not fatal
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items):
    return items


@dataclass
class EmbedResult:
    paths: list[str]                                   # embedded files, input order
    embeddings: torch.Tensor                           # [N, D] fp32, unit norm
    skipped: list[dict] = field(default_factory=list)  # [{path, reason}]
    cached: int = 0                                    # how many came from the cache


def embed_files(paths: Sequence, scorer, cache=None, batch_size: int = 64, num_workers: int = 0,
                timeout_s: float | None = 30.0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                progress: Callable | None = None) -> EmbedResult:
    """Embed image files (streaming; cache-aware). Order of ``paths`` is kept in the result."""
    from clipkit.rerank.cache import file_key
    paths = [Path(p) for p in paths]
    keys: list = []
    skipped: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            keys.append(file_key(p))
        except OSError as e:
            keys.append(None)
            skipped[i] = "no such file" if isinstance(e, FileNotFoundError) else (e.strerror or str(e))
    vecs: dict[int, torch.Tensor] = {}
    cached = 0
    if cache is not None:
        hits, bad = cache.lookup([k for k in keys if k is not None])
        for i, k in enumerate(keys):
            if k is None:
                continue
            if k[0] in hits:
                vecs[i] = torch.from_numpy(hits[k[0]].copy())
            elif k[0] in bad:
                skipped[i] = bad[k[0]]
        cached = len(vecs)
    todo = [i for i in range(len(paths)) if i not in vecs and i not in skipped]
    if todo:
        ds = _Files([paths[i] for i in todo], scorer.preprocess, timeout_s, max_pixels)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                            shuffle=False, persistent_workers=False)
        for batch in (progress(loader, total=len(loader)) if progress else loader):
            good = [(todo[j], x) for j, x, r in batch if x is not None]
            bad_rows = [(todo[j], r) for j, x, r in batch if x is None]
            for i, r in bad_rows:
                skipped[i] = r
                log.warning("skipped %s: %s", paths[i], r)
            emb = scorer._encode_pixels_batch(torch.stack([x for _, x in good])) if good else None
            for n, (i, _) in enumerate(good):
                vecs[i] = emb[n].cpu()
            if cache is not None:
                cache.put([(keys[i], vecs[i]) for i, _ in good], [(keys[i], r) for i, r in bad_rows])
    order = [i for i in range(len(paths)) if i in vecs]
    dim = next(iter(vecs.values())).numel() if vecs else 0
    emb = torch.stack([vecs[i] for i in order]) if order else torch.zeros(0, dim)
    return EmbedResult([str(paths[i]) for i in order], emb,
                       [{"path": str(paths[i]), "reason": skipped[i]} for i in sorted(skipped)], cached)


def embed_folder_distributed(folders, out_path, scorer, batch_size: int = 64, num_workers: int = 0,
                             timeout_s: float | None = 30.0, overwrite: bool = False) -> dict | None:
    """Embed the images under ``folders`` into ``out_path`` (safetensors), sharded over the
    processes of ``accelerate launch`` (``PartialState.split_between_processes``).

    Each process writes its shard beside ``out_path``; after a barrier the main process merges the
    shards in file order and removes them. Returns a summary on the main process, None elsewhere.
    """
    import json
    import os

    from safetensors.torch import load_file, save_file

    from clipkit.core.dist import partial_state

    from clipkit.core.errors import InputError
    from clipkit.core.io import scan_images
    out = Path(out_path)
    state = partial_state()
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists (use --overwrite)")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    files = scan_images(folders)
    if not files:
        raise InputError("no image files found")
    index = list(range(len(files)))
    with state.split_between_processes(index) as mine:
        res = embed_files([files[i] for i in mine], scorer, batch_size=batch_size,
                          num_workers=num_workers, timeout_s=timeout_s)
    shard = out.with_name(f".{out.name}.shard{state.process_index}")
    save_file({"embeddings": res.embeddings.contiguous()}, str(shard),
              metadata={"paths": json.dumps(res.paths), "skipped": json.dumps(res.skipped)})
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    paths, embs, skipped = [], [], []
    for r in range(state.num_processes):
        sp = out.with_name(f".{out.name}.shard{r}")
        from safetensors import safe_open
        with safe_open(str(sp), "pt") as f:
            meta = f.metadata()
        t = load_file(str(sp))["embeddings"]
        paths += json.loads(meta["paths"])
        skipped += json.loads(meta["skipped"])
        if len(t):
            embs.append(t)
        os.remove(sp)
    emb = torch.cat(embs) if embs else torch.zeros(0, 0)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={
        "paths": json.dumps(paths), "skipped": json.dumps(skipped), "model": scorer.spec,
        "preprocess": json.dumps(scorer.preprocess.to_dict()), "processes": str(state.num_processes)})
    os.replace(tmp, out)
    return {"count": len(paths), "skipped": skipped}
