"""Near-duplicate groups: items whose embeddings have cosine >= a threshold, joined transitively.

1. every visible item asks the ANN for its neighbours within the threshold (FAISS ``range_search``,
   a slightly lower radius so that boundary pairs are not lost to rounding);
2. each pair found is re-scored exactly on the stored fp16 embeddings and kept if >= threshold;
3. pairs are joined with union-find into groups; each group lists its items by cosine with its
   representative (its first path), ties by path; groups are ordered by size, then path.

With an exact-scan index (one list) every pair is found; with an IVF index, pairs whose items fall
in lists that neither probes are missed (the same recall as search).
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clipkit.core.errors import InputError
from clipkit.core.ranking import RankedItem, RankingResult, cosines, order
from clipkit.search.store import IndexReader

MAX_PAIRS = 20_000_000        # a threshold that links more pairs than this is refused (too low)
SHEETS_LIMIT = 100            # contact sheets written at most (the first groups)


def sheet_name(group: int) -> str:
    return f"group-{group:04d}.png"


@dataclass
class DupItem:
    id: int
    path: str
    score: float                # cosine with the group's representative (1.0 for itself)


@dataclass
class DupGroup:
    group: int                  # 1-based, groups ordered by size then path
    items: list[DupItem]


@dataclass
class DedupResult:
    index: str
    threshold: float
    scanned: int                # items compared
    pairs: int                  # pairs at or above the threshold
    groups: list[DupGroup] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "duplicates": sum(len(g.items) - 1 for g in self.groups)}

    def write_csv(self, path, overwrite: bool = False) -> Path:
        from clipkit.core.outputs import write_atomic

        def write(tmp: Path):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["group", "id", "score", "path"])
                for g in self.groups:
                    for it in g.items:
                        w.writerow([g.group, it.id, f"{it.score:.6f}", it.path])
        return write_atomic(path, write, overwrite=overwrite)

    def contact_sheets(self, folder, loader: Callable, overwrite: bool = False, limit: int = SHEETS_LIMIT,
                       inputs=()) -> list[Path]:
        """One contact sheet per group (``group-0001.png`` ...), at most ``limit`` groups; a sheet
        that would replace one of ``inputs`` is refused."""
        from clipkit.core.outputs import check_output_dir, check_output_file
        out = check_output_dir(folder, what="--sheets folder")
        paths = [out / sheet_name(g.group) for g in self.groups[:limit]]
        for p in paths:
            check_output_file(p, overwrite=overwrite, inputs=inputs, what="contact sheet")
        by_id = {}
        for p, g in zip(paths, self.groups[:limit]):
            items = [RankedItem(rank=n + 1, score=it.score, path=it.path) for n, it in enumerate(g.items)]
            by_id.update({it.path: it.id for it in g.items})
            RankingResult([f"group {g.group}"], "", items).contact_sheet(
                p, overwrite=overwrite, loader=lambda r: loader(by_id[r.path]))
        return paths


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:                       # path compression
        parent[i], i = root, parent[i]
    return root


def dedup(reader: IndexReader, threshold: float, nprobe: int | None = None, batch: int = 1024,
          progress: Callable | None = None) -> DedupResult:
    """Near-duplicate groups of the visible items of ``reader`` at cosine >= ``threshold``."""
    import faiss
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise InputError(f"threshold must be in (0, 1], got {threshold!r}")
    index = reader.ann_index()
    ivf = faiss.extract_index_ivf(index)
    params = faiss.SearchParametersIVF(nprobe=int(min(ivf.nlist, max(1, nprobe or reader.nprobe))))
    parent = np.arange(reader.manifest.rows, dtype=np.int64)
    mask = reader.alive_mask()
    radius = threshold - 1e-3                       # fp16 codes vs exact re-scoring: keep boundary pairs
    pairs = scanned = 0
    touched: set[int] = set()
    chunks = reader.iter_vectors(batch, mask)
    if progress:
        chunks = progress(chunks, (int(mask.sum()) + batch - 1) // batch)
    for ids, x in chunks:
        scanned += len(ids)
        lims, _, found = index.range_search(np.ascontiguousarray(x), radius, params=params)
        src = np.repeat(ids, np.diff(lims.astype(np.int64)))
        keep = found > src                          # each pair once, never an item with itself
        a, b = src[keep], found[keep]
        if not len(a):
            continue
        va = reader.vectors(a).astype(np.float64)
        vb = reader.vectors(b).astype(np.float64)
        exact = (va * vb).sum(axis=1)
        ok = np.round(exact * 1e6) >= round(threshold * 1e6)
        pairs += int(ok.sum())
        if pairs > MAX_PAIRS:
            raise InputError(f"threshold {threshold:g} links more than {MAX_PAIRS} pairs: raise it")
        for i, j in zip(a[ok].tolist(), b[ok].tolist()):
            touched.update((i, j))
            ri, rj = _find(parent, i), _find(parent, j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    # groups: the items linked to at least one other, by root
    members: dict[int, list[int]] = {}
    for i in sorted(touched):
        members.setdefault(_find(parent, i), []).append(i)
    groups = []
    for ids_ in members.values():
        if len(ids_) < 2:
            continue
        items = reader.items(ids_)
        ids_ = sorted(ids_, key=lambda i: items[i].path)
        vec = torch.from_numpy(reader.vectors(ids_))
        scores = cosines(vec, vec[:1])[:, 0]
        names = [items[i].path for i in ids_]
        groups.append([DupItem(ids_[j], names[j], float(scores[j])) for j, _ in order(names, scores, None)])
    groups.sort(key=lambda g: (-len(g), min(it.path for it in g)))
    return DedupResult(str(reader.path), float(threshold), scanned, pairs,
                       [DupGroup(n + 1, g) for n, g in enumerate(groups)])
