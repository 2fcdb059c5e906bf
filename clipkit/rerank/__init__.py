"""Retrieval-based reranking: rank images (or caption candidates) against a query by CLIP score.

* :mod:`clipkit.rerank.cache`  embedding cache (SQLite: atomic, resumable, safe for concurrent runs)
* :mod:`clipkit.rerank.embed`  streaming, error-tolerant batch embedding of image files
* :mod:`clipkit.rerank.rank`   ranking API (``rerank``) and report writers
"""
from clipkit.rerank.rank import RankedItem, RerankResult, rank_texts, rerank  # noqa: F401
