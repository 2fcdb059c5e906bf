"""Search at scale: an appendable ANN index over CLIP embeddings, and a local web page.

* :mod:`clipkit.search.sources`   folders, file lists and webdataset tar shards -> items
* :mod:`clipkit.search.ann`       the FAISS structure, chosen under a memory budget; nprobe tuning
* :mod:`clipkit.search.manifest`  the index folder's layout and manifest, the model it was built with
* :mod:`clipkit.search.meta`      its SQLite metadata (items, generations)
* :mod:`clipkit.search.segments`  its fp16 segments, codes, quantiser; the writers' lock and recovery
* :mod:`clipkit.search.store`     ``IndexReader``: an index opened for search
* :mod:`clipkit.search.ingest`    the rows of a new segment (images, shards or bare vectors)
* :mod:`clipkit.search.tuning`    train / extend the ANN, encode segments, tune nprobe
* :mod:`clipkit.search.build`     ``build_index`` (resumable, atomic)
* :mod:`clipkit.search.add`       ``add_to_index`` (under the writer lock, committed by the manifest)
* :mod:`clipkit.search.query`     ``search`` by text, image, item or vector (core's ranking order)
* :mod:`clipkit.search.dedup`     near-duplicate groups
* :mod:`clipkit.search.web`       the web plumbing: Host/Origin checks, upload limits, decoding budget, server
* :mod:`clipkit.search.server`    the Flask app behind ``clipkit serve`` (the search routes)

It shares core's embedding stream (:mod:`clipkit.core.embedding`), cache (:mod:`clipkit.core.cache`)
and ranking (:mod:`clipkit.core.ranking`) with rerank; it imports no other plugin.
"""
from clipkit.search.add import add_to_index  # noqa: F401
from clipkit.search.ann import AnnConfig  # noqa: F401
from clipkit.search.build import build_index  # noqa: F401
from clipkit.search.dedup import DedupResult, dedup  # noqa: F401
from clipkit.search.ingest import IndexResult, VectorSource  # noqa: F401
from clipkit.search.query import SearchHit, SearchResult, open_index, search  # noqa: F401
from clipkit.search.store import IndexReader  # noqa: F401
