"""Query an index by text, image, indexed item or vector; results in core's ranking order
(the one ``rerank`` uses).

The ANN proposes ``2K + 8`` candidates; each is then scored exactly (fp64 sum of products of the
fp32 query with the stored fp16 embedding, :func:`clipkit.core.ranking.cosines`) and ordered by
:func:`clipkit.core.ranking.order`: score descending, rounded to 1e-6, ties by path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from clipkit.core.errors import InputError
from clipkit.core.ranking import RankedItem, RankingResult, cosines, order
from clipkit.search.store import IndexReader

#: Most results one query returns (the page asks for pages of these).
MAX_TOP = 1000


@dataclass(slots=True)
class SearchHit(RankedItem):
    id: int | None = None               # the item's id in the index
    caption: str | None = None          # its caption, when the source had one


@dataclass
class SearchResult(RankingResult):
    index: str = ""
    structure: str = ""                 # FAISS factory string of the index
    nprobe: int = 0
    took_ms: float = 0.0


def search_vectors(reader: IndexReader, q: np.ndarray, top_k: int, nprobe: int | None = None) -> list[SearchHit]:
    """[D] query vector -> the ``top_k`` best items (exact scores, core's ranking order)."""
    import faiss
    if not 1 <= top_k <= MAX_TOP:
        raise InputError(f"top must be between 1 and {MAX_TOP}, got {top_k}")
    q = np.asarray(q, dtype=np.float32).reshape(1, -1)
    if q.shape[1] != reader.dim:
        raise InputError(f"a {q.shape[1]}-d query for an index of {reader.dim}-d embeddings")
    if not np.isfinite(q).all():
        raise InputError("the query vector is not finite")
    index = reader.ann_index()
    k2 = int(min(max(1, index.ntotal), 2 * top_k + 8))
    nlist = faiss.extract_index_ivf(index).nlist
    params = faiss.SearchParametersIVF(nprobe=int(min(nlist, max(1, nprobe or reader.nprobe))))
    _, ids = index.search(q, k2, params=params)
    ids = ids[0][ids[0] >= 0]
    if not len(ids):
        return []
    items = reader.items(ids)
    ids = np.array([i for i in ids if int(i) in items], dtype=np.int64)   # visible now
    scores = cosines(torch.from_numpy(reader.vectors(ids)), torch.from_numpy(q))[:, 0]
    names = [items[int(i)].path for i in ids]
    out = []
    for j, rank in order(names, scores, top_k):
        it = items[int(ids[j])]
        out.append(SearchHit(rank=rank, score=float(scores[j]), path=it.path, id=it.id, caption=it.caption))
    return out


def query_vector(reader: IndexReader, scorer=None, *, text: str | None = None, image=None,
                 item: int | None = None, vector=None) -> tuple[np.ndarray, str]:
    """Exactly one of text / image (path or PIL) / item id / vector -> ([D] fp32 query, its label)."""
    given = [x is not None for x in (text, image, item, vector)]
    if sum(given) != 1:
        raise InputError("give exactly one query: a text, an image, an item id or a vector")
    if item is not None:
        it = reader.item(int(item))
        return reader.vectors([it.id])[0], f"item #{it.id} ({it.path})"
    if vector is not None:
        return np.asarray(vector, dtype=np.float32).reshape(-1), "<vector>"
    if scorer is None:
        raise InputError("a text or image query needs the index's CLIP")
    reader.check_scorer(scorer)
    if text is not None:
        from clipkit.core.backends import check_texts
        t = check_texts([text])
        return scorer.encode_texts(t)[0].float().cpu().numpy(), t[0]
    from clipkit.core.io import load_image
    from PIL import Image
    im = image if isinstance(image, Image.Image) else load_image(image)
    label = "<image>" if isinstance(image, Image.Image) else str(image)
    return scorer.encode_images([im])[0].float().cpu().numpy(), label


def search(reader: IndexReader, scorer=None, *, text: str | None = None, image=None, item: int | None = None,
           vector=None, top_k: int = 10, nprobe: int | None = None) -> SearchResult:
    """Search an index (opened with :class:`~clipkit.search.store.IndexReader`) by one query."""
    t0 = time.perf_counter()
    q, label = query_vector(reader, scorer, text=text, image=image, item=item, vector=vector)
    hits = search_vectors(reader, q, top_k, nprobe)
    return SearchResult(query=[label], model=reader.model, results=hits, candidates=len(reader),
                        index=str(reader.path), structure=reader.manifest.ann.get("factory", ""),
                        nprobe=int(nprobe or reader.nprobe), took_ms=round((time.perf_counter() - t0) * 1e3, 3))


def open_index(path) -> IndexReader:
    return IndexReader(path)
