"""Retrieval-based reranking: rank images (or caption candidates) against a query by CLIP score.

The package is callable: ``clipkit.rerank(...)`` is :func:`clipkit.rerank.rank.rerank`.

* :mod:`clipkit.rerank.rank`   ranking API (``rerank``, ``rank_texts``)
* :mod:`clipkit.rerank.embed`  ``clipkit embed``: a folder into one file, sharded under ``accelerate launch``

What search shares with it lives in core: the embedding cache (:mod:`clipkit.core.cache`), the
streaming embedder (:mod:`clipkit.core.embedding`), scores, order and reports (:mod:`clipkit.core.ranking`).
"""
import inspect
import sys
import types

from clipkit.rerank.rank import RankedItem, RerankResult, rank_texts, rerank  # noqa: F401


class _CallableModule(types.ModuleType):
    """``clipkit.rerank`` is both the public function and this subpackage (DESIGN keeps the name).
    Whatever ``clipkit.__getattr__`` returns, importing any ``clipkit.rerank.*`` submodule makes
    Python bind ``clipkit.rerank`` to this package, so a lazily returned function would be replaced
    by a module after the first call. Making the package itself callable gives one object that is
    both, whatever was imported first; it needs no torch in ``import clipkit`` and no rename."""

    def __call__(self, *args, **kwargs):
        from clipkit.rerank.rank import rerank  # looked up per call: a patched rank.rerank is honoured
        return rerank(*args, **kwargs)

    @property
    def __signature__(self):                     # inspect.signature / help show rerank's arguments

        from clipkit.rerank.rank import rerank
        return inspect.signature(rerank)


sys.modules[__name__].__class__ = _CallableModule
