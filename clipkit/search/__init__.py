"""Search at scale: an appendable ANN index over CLIP embeddings, and a local web page.

* :mod:`clipkit.search.sources` folders, file lists and webdataset tar shards -> items
* :mod:`clipkit.search.ann`     the FAISS structure, chosen under a memory budget; nprobe tuning
* :mod:`clipkit.search.store`   the index folder (fp16 segments, codes, SQLite metadata, manifest)
* :mod:`clipkit.search.build`   ``build_index`` / ``add_to_index`` (resumable, atomic)
* :mod:`clipkit.search.query`   ``search`` by text, image, item or vector (core's ranking order)
* :mod:`clipkit.search.dedup`   near-duplicate groups
* :mod:`clipkit.search.server`  the Flask app behind ``clipkit serve``

It shares core's embedding stream (:mod:`clipkit.core.embedding`), cache (:mod:`clipkit.core.cache`)
and ranking (:mod:`clipkit.core.ranking`) with rerank; it imports no other plugin.
"""
from clipkit.search.ann import AnnConfig  # noqa: F401
from clipkit.search.build import IndexResult, VectorSource, add_to_index, build_index  # noqa: F401
from clipkit.search.dedup import DedupResult, dedup  # noqa: F401
from clipkit.search.query import SearchHit, SearchResult, open_index, search  # noqa: F401
from clipkit.search.store import IndexReader  # noqa: F401
