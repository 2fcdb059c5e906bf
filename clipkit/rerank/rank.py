"""Rank candidates against a query by CLIP cosine; reports as JSON, CSV or a contact sheet.

Order is by score (descending) with ties broken by path (ascending); scores are rounded to 1e-6 for
the comparison only, so results do not reorder with the batch size (FIELD_NOTES D).
"""
from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from clipkit.core.errors import InputError

Query = Union[str, Sequence[str], Image.Image, os.PathLike]

#: Most thumbnails on a contact sheet (a ranking of every file in a big folder stays drawable).
SHEET_LIMIT = 100


@dataclass(slots=True)
class RankedItem:
    rank: int
    score: float                 # cosine similarity with the query (or the weighted mean over queries)
    path: str | None = None      # image candidates
    text: str | None = None      # text candidates

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class RerankResult:
    query: list[str]
    model: str
    results: list[RankedItem]
    skipped: list[dict] = field(default_factory=list)
    candidates: int = 0
    cached: int = 0
    weights: list[float] | None = None
    score: str = "cosine"

    def to_dict(self) -> dict:
        d = asdict(replace(self, results=[]))          # not a deep copy of every result first
        d["results"] = [r.to_dict() for r in self.results]
        return d

    def write_csv(self, path, overwrite: bool = False) -> Path:
        """The ranking as CSV (atomically; an existing file only with ``overwrite``)."""
        from clipkit.core.outputs import write_atomic

        def write(tmp: Path):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["rank", "score", "path" if self.results and self.results[0].path else "text"])
                for r in self.results:
                    w.writerow([r.rank, f"{r.score:.6f}", r.path or r.text])
        return write_atomic(path, write, overwrite=overwrite)

    def contact_sheet(self, path, thumb: int = 128, cols: int = 5, limit: int = SHEET_LIMIT,
                      overwrite: bool = False, loader=None) -> Path:
        """The ``limit`` best results as a grid of thumbnails with rank and score under each.
        ``loader(item) -> PIL image`` reads a result's image (default: ``load_image(item.path)``)."""
        from PIL import ImageDraw

        from clipkit.core.io import load_image
        items = [r for r in self.results[:limit] if r.path]
        if not items:
            raise InputError("a contact sheet needs image results")
        rows = (len(items) + cols - 1) // cols
        label_h = 16
        sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + label_h + 8) + 8), (32, 32, 32))
        draw = ImageDraw.Draw(sheet)
        from clipkit.core.errors import ImageLoadError
        from clipkit.core.outputs import write_atomic
        for n, r in enumerate(items):
            try:
                im = loader(r) if loader is not None else load_image(r.path)
            except (ImageLoadError, InputError):   # changed since it was ranked: an empty tile, not a failed run
                continue
            im.thumbnail((thumb, thumb))
            x = 8 + (n % cols) * (thumb + 8)
            y = 8 + (n // cols) * (thumb + label_h + 8)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            draw.text((x, y + thumb + 2), f"#{r.rank}  {r.score:.3f}", fill=(230, 230, 230))
        return write_atomic(path, lambda t: sheet.save(t), overwrite=overwrite)


def order(names: Sequence[str], scores: torch.Tensor, top_k: int | None) -> list[tuple[int, int]]:
    """-> [(index, rank)] by score descending (rounded to 1e-6), ties by name; the ``top_k`` best only.

    Exact top-K without sorting everything: keep the candidates whose rounded score reaches the K-th
    best (K of them plus any tied at the boundary), then sort those by (score, name); only they touch
    ``names``, so a top-K over N files builds O(K) Python objects.
    """
    keys = _rounded(scores)
    if top_k and top_k < len(keys):
        cand = torch.nonzero(keys >= torch.topk(keys, top_k).values[-1]).flatten()
    else:
        cand = torch.arange(len(keys))
    ci, ck = cand.tolist(), keys[cand].tolist()
    ranked = sorted(range(len(ci)), key=lambda j: (-ck[j], names[ci[j]]))[:top_k]
    return [(ci[j], r + 1) for r, j in enumerate(ranked)]


def _rounded(scores: torch.Tensor) -> torch.Tensor:
    """[N] scores -> [N] int64 round(score * 1e6), half to even: the integer form of Python's
    ``round(score, 6)`` (x * 1e6 is exact in fp64 for every fp32 x, so both round the same value)."""
    return torch.round(scores.detach().cpu().double() * 1e6).long()


def cosines(emb: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, D] x [Q, D] unit vectors -> [B, Q] in ``q``'s dtype, on the CPU.

    Each score is a NumPy sum over D of exact fp64 products, reduced row by row in a fixed order,
    so it does not depend on how the rows were chunked (a matmul's blocking does): cache hits score
    exactly like freshly encoded files, in any chunking. NumPy is single-threaded here, which keeps
    small per-chunk products fast on a busy machine.
    """
    e = emb.detach().cpu().numpy().astype(np.float64)
    sims = np.stack([(e * qj).sum(axis=1) for qj in q.detach().cpu().numpy().astype(np.float64)], axis=1)
    return torch.from_numpy(sims).to(q.dtype)


def _query_embeddings(scorer, queries: Sequence, kind: str) -> torch.Tensor:
    if kind == "text":
        return scorer.encode_texts(list(queries))
    return scorer.encode_images(list(queries))


def combine(sim: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """[N, Q] cosines -> [N] weighted mean (weights default to equal)."""
    w = torch.tensor(weights if weights is not None else [1.0] * sim.shape[1], dtype=sim.dtype)
    if len(w) != sim.shape[1]:
        raise InputError(f"{len(w)} weights for {sim.shape[1]} queries")
    if (w < 0).any() or float(w.sum()) <= 0:
        raise InputError("weights must be non-negative and not all zero")
    return sim @ (w / w.sum())


def rerank(candidates, query: Query | None = None, scorer=None, top_k: int | None = None, *,
           query_images: Sequence | None = None, weights: Sequence[float] | None = None,
           per_query: bool = False, cache=None, batch_size: int = 64, num_workers: int = 0,
           timeout_s: float | None = 30.0, progress=None):
    """Rank image candidates against a text query (or several), or against query images.

    Args:
        candidates: files and folders (walked recursively), PIL images, or a tensor [N,3,H,W] in [0,1]
            (e.g. generated samples; then results carry ``path="#i"``).
        query: a text or a list of texts. ``query_images``: images instead of texts.
        weights: for several queries, the weights of their combined score (weighted mean of cosines).
        per_query: return one RerankResult per query instead of the combined one.
        cache: an :class:`~clipkit.rerank.cache.EmbeddingCache` (file candidates only).
    """
    if scorer is None:
        from clipkit.core.scorer import load_scorer
        scorer = load_scorer("shapes")
    if (query is None) == (query_images is None):
        raise InputError("give a text query or query images (exactly one)")
    if query is not None:
        from clipkit.core.backends import check_texts
        queries, kind = check_texts([query] if isinstance(query, str) else list(query)), "text"
    else:
        queries, kind = list(query_images), "image"
        if not queries:
            raise InputError("no query images")
    q = _query_embeddings(scorer, queries, kind).cpu()                     # [Q, D]
    skipped, cached = [], 0
    if isinstance(candidates, torch.Tensor) or (candidates and all(isinstance(c, Image.Image) for c in candidates)):
        sim = cosines(scorer.encode_images(candidates), q)                  # [N, Q]
        names = [f"#{i}" for i in range(len(sim))]
    else:
        sim, names, skipped, cached = _score_files(candidates, scorer, q, cache, batch_size, num_workers,
                                                   timeout_s, progress)
    qnames = [str(x) for x in queries]

    def make(scores, qs, w):
        items = [RankedItem(rank=r, score=float(scores[i]), path=names[i]) for i, r in order(names, scores, top_k)]
        return RerankResult(qs, scorer.spec, items, skipped, len(names) + len(skipped), cached, w)
    if per_query:
        return [make(sim[:, j], [qnames[j]], None) for j in range(len(qnames))]
    return make(combine(sim, weights), qnames, list(weights) if weights else None)


class _Names:
    """``files[index[i]]`` as a string, made on demand (no list of N strings)."""

    def __init__(self, files: list, index: torch.Tensor):
        self.files, self.index = files, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return str(self.files[int(self.index[i])])


def _score_files(candidates, scorer, q, cache, batch_size, num_workers, timeout_s, progress):
    """Stream the candidates' embeddings (cache hits, then encoded batches) into [N, Q] scores;
    -> (scores of the readable files in input order, their names, skipped, cached)."""
    from clipkit.core.io import scan_images
    from clipkit.rerank.embed import EmbeddingStream
    files = scan_images(candidates)
    if not files:
        raise InputError("no image files found among the candidates")
    stream = EmbeddingStream(files, scorer, cache=cache, batch_size=batch_size, num_workers=num_workers,
                             timeout_s=timeout_s, progress=progress)
    sim = torch.zeros(len(files), len(q), dtype=q.dtype)
    have = torch.zeros(len(files), dtype=torch.bool)
    for chunk in stream:
        sim[chunk.index] = cosines(chunk.embeddings, q)
        have[chunk.index] = True
    keep = have.nonzero().flatten()
    if not len(keep):
        raise InputError(f"none of the {len(files)} candidate files could be read")
    return sim[keep], _Names(files, keep), stream.skipped_list(), stream.cached


def rank_texts(image, texts: Sequence[str], scorer=None, top_k: int | None = None) -> RerankResult:
    """Rank caption candidates for one image (e.g. ClipCap candidates) by cosine with the image."""
    from clipkit.core.backends import check_texts
    from clipkit.core.io import load_image
    if scorer is None:
        from clipkit.core.scorer import load_scorer
        scorer = load_scorer("shapes")
    texts = check_texts(texts)
    img = image if isinstance(image, torch.Tensor) else [load_image(image)]
    sim = cosines(scorer.encode_texts(texts), scorer.encode_images(img).cpu())[:, 0]
    items = [RankedItem(rank=r, score=float(sim[i]), text=texts[i]) for i, r in order(texts, sim, top_k)]
    return RerankResult([str(image) if not isinstance(image, torch.Tensor) else "<tensor>"], scorer.spec,
                        items, [], len(texts))
