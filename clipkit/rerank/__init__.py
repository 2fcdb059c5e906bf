"""Retrieval-based reranking: rank images (or caption candidates) against a query by CLIP score.

* :mod:`clipkit.rerank.rank`   ranking API (``rerank``, ``rank_texts``)
* :mod:`clipkit.rerank.embed`  ``clipkit embed``: a folder into one file, sharded under ``accelerate launch``

What search shares with it lives in core: the embedding cache (:mod:`clipkit.core.cache`), the
streaming embedder (:mod:`clipkit.core.embedding`), scores, order and reports (:mod:`clipkit.core.ranking`).
"""
from clipkit.rerank.rank import RankedItem, RerankResult, rank_texts, rerank  # noqa: F401
