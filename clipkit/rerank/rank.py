"""Rank a folder of images (or caption candidates) against a query by CLIP cosine.

The scores, the order (score descending, rounded to 1e-6, ties by path) and the reports (JSON, CSV,
contact sheet) are core's (:mod:`clipkit.core.ranking`); this module walks the candidates, streams
their embeddings through the cache, and combines several queries.
"""
from __future__ import annotations

import math
import os
from typing import Sequence, Union

import torch
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.core.ranking import RankedItem, RankingResult, cosines, order
from clipkit.core.scorer import load_scorer
from clipkit.core.backends import check_texts
from clipkit.core.io import load_image, scan_images
from clipkit.core.embedding import EmbeddingStream

Query = Union[str, Sequence[str], Image.Image, os.PathLike]

#: rerank's name for core's :class:`~clipkit.core.ranking.RankingResult` (the same class).
RerankResult = RankingResult


def _query_embeddings(scorer, queries: Sequence, kind: str) -> torch.Tensor:
    if kind == "text":
        return scorer.encode_texts(list(queries))
    return scorer.encode_images(list(queries))


def combine(sim: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """[N, Q] cosines -> [N] weighted mean (weights default to equal). The weights are normalised in
    float64 (``1e200,1e200`` is ``0.5,0.5``); weights that are not finite, or whose sum overflows,
    and a combined score that is not finite are a one-line InputError, never a NaN score."""
    w = torch.tensor(weights if weights is not None else [1.0] * sim.shape[1], dtype=torch.float64)
    if len(w) != sim.shape[1]:
        raise InputError(f"{len(w)} weights for {sim.shape[1]} queries")
    if not torch.isfinite(w).all():
        raise InputError(f"weights {list(weights)!r}: every weight must be a finite number")
    if (w < 0).any() or float(w.sum()) <= 0:
        raise InputError("weights must be non-negative and not all zero")
    total = float(w.sum())
    if not math.isfinite(total):
        raise InputError(f"weights {','.join(f'{x:g}' for x in weights)}: their sum overflows (is not a finite "
                         "number): use smaller weights (only their ratios matter)")
    scores = sim @ (w / total).to(sim.dtype)
    if not torch.isfinite(scores).all():
        raise InputError("the combined scores are not finite numbers: check the --weights")
    return scores


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
        cache: an :class:`~clipkit.core.cache.EmbeddingCache` (file candidates only).
    """
    if scorer is None:
        scorer = load_scorer("shapes")
    if (query is None) == (query_images is None):
        raise InputError("give a text query or query images (exactly one)")
    if query is not None:
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
    if scorer is None:
        scorer = load_scorer("shapes")
    texts = check_texts(texts)
    img = image if isinstance(image, torch.Tensor) else [load_image(image)]
    sim = cosines(scorer.encode_texts(texts), scorer.encode_images(img).cpu())[:, 0]
    items = [RankedItem(rank=r, score=float(sim[i]), text=texts[i]) for i, r in order(texts, sim, top_k)]
    return RerankResult([str(image) if not isinstance(image, torch.Tensor) else "<tensor>"], scorer.spec,
                        items, [], len(texts))
