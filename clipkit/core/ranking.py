"""Ranking primitives shared by every plugin that orders candidates by CLIP score (rerank, search,
captioning's candidate selection, generate's best-of).

* :func:`cosines`  exact, chunking-independent fp64 cosines of unit vectors;
* :func:`order`    the one order: score descending (rounded to 1e-6), ties by key; exact top-K;
* :class:`RankedItem` / :class:`RankingResult`  a ranking as data, with its JSON/CSV/contact-sheet reports.

Scores are rounded to 1e-6 for the comparison only, so results do not reorder with the batch size
(FIELD_NOTES D).
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipkit.core.errors import ImageLoadError, InputError
from clipkit.core.io import load_image
from clipkit.core.outputs import write_atomic

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
class RankingResult:
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

        def write(tmp: Path):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["rank", "score", "path" if self.results and self.results[0].path else "text"])
                for r in self.results:
                    w.writerow([r.rank, f"{r.score:.6f}", r.path or r.text])
        return write_atomic(path, write, overwrite=overwrite)

    def contact_sheet(self, path, thumb: int = 128, cols: int = 5, limit: int = SHEET_LIMIT,
                      overwrite: bool = False, loader=None) -> Path:
        """The ``limit`` best results as a grid of thumbnails with rank and score under each (a result
        whose image is gone or changed: a tile labelled "missing").
        ``loader(item) -> PIL image`` reads a result's image (default: ``load_image(item.path)``)."""

        items = [r for r in self.results[:limit] if r.path]
        if not items:
            raise InputError("a contact sheet needs image results")
        rows = (len(items) + cols - 1) // cols
        label_h = 16
        sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + label_h + 8) + 8), (32, 32, 32))
        draw = ImageDraw.Draw(sheet)
        for n, r in enumerate(items):
            x = 8 + (n % cols) * (thumb + 8)
            y = 8 + (n // cols) * (thumb + label_h + 8)
            try:
                im = loader(r) if loader is not None else load_image(r.path)
            except (ImageLoadError, InputError):   # gone or changed since it was ranked: a tile saying so
                im = None
            label = f"#{r.rank}  {r.score:.3f}"
            if im is None:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=(120, 120, 120))
                l, t, rt, b = draw.textbbox((0, 0), "missing")
                draw.text((x + (thumb - (rt - l)) // 2, y + (thumb - (b - t)) // 2), "missing", fill=(230, 230, 230))
                label += "  missing"
            else:
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            draw.text((x, y + thumb + 2), label, fill=(230, 230, 230))
        return write_atomic(path, lambda t: sheet.save(t), overwrite=overwrite)


def order(keys: Sequence[Any], scores: torch.Tensor, top_k: int | None) -> list[tuple[int, int]]:
    """[N] scores -> [(index, rank)] by score descending (rounded to 1e-6), ties by ``keys[index]``
    ascending (paths, texts, seeds: anything comparable); the ``top_k`` best only (None: all).

    Exact top-K without sorting everything: keep the candidates whose rounded score reaches the K-th
    best (K of them plus any tied at the boundary), then sort those by (score, key); only they touch
    ``keys``, so a top-K over N files builds O(K) Python objects.
    """
    rounded = _rounded(scores)
    if top_k and top_k < len(rounded):
        cand = torch.nonzero(rounded >= torch.topk(rounded, top_k).values[-1]).flatten()
    else:
        cand = torch.arange(len(rounded))
    ci, ck = cand.tolist(), rounded[cand].tolist()
    ranked = sorted(range(len(ci)), key=lambda j: (-ck[j], keys[ci[j]]))[:top_k]
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
