"""core.embedding: the embedding stream (workers that encode, decode timeouts, batches not kept, cache read
in chunks) and ``embed_files``, on the candidates folder of tests/conftest.py (``rerank_folder``)."""
import multiprocessing as mp
import time

import torch
from PIL import Image

from clipkit.core.cache import EmbeddingCache
from clipkit.core.embedding import embed_files
from clipkit.rerank.rank import rerank
from helpers import RERANK_BAD as BAD   # tests/ is on sys.path (conftest.py)


def test_workers_that_encode_give_the_main_process_results(rerank_folder, shapes_scorer):
    """Opt-in on a CPU: forked DataLoader workers encode their own batches; same files, order, reasons
    and embeddings (1e-5) as encoding in the main process or with no workers at all."""
    from clipkit.core.embedding import EmbeddingStream, encode_in_workers
    d, _ = rerank_folder
    from clipkit.core.io import scan_images
    files = scan_images([d])
    assert encode_in_workers(shapes_scorer, 2) == (mp.get_start_method() == "fork")
    assert not encode_in_workers(shapes_scorer, 0)
    runs = {}
    for name, workers, in_workers in (("none", 0, False), ("main", 2, False), ("workers", 2, True)):
        stream = EmbeddingStream(files, shapes_scorer, batch_size=5, num_workers=workers, workers_encode=in_workers)
        out = torch.zeros(len(files), 128)
        for chunk in stream:
            out[chunk.index] = chunk.embeddings
        runs[name] = (out, stream.skipped_list())
    for name in ("main", "workers"):
        assert runs[name][1] == runs["none"][1] and len(runs[name][1]) == len(BAD)
        assert torch.allclose(runs[name][0], runs["none"][0], atol=1e-5)
    assert runs["none"][0].abs().sum(1).gt(0).sum() == len(files) - len(BAD)


def test_decode_timeout(monkeypatch, rerank_folder, shapes_scorer):
    import clipkit.core.io as io
    d, _ = rerank_folder
    real = io._to_rgb

    def slow(im, background):           # a decoder that hangs on one file, inside the time bound
        if getattr(slow, "calls", 0) == 0:
            slow.calls = 1
            time.sleep(5)
        return real(im, background)
    monkeypatch.setattr(io, "_to_rgb", slow)
    res = embed_files([d / "005.png", d / "006.png"], shapes_scorer, timeout_s=0.5)
    assert res.paths == [str(d / "006.png")]
    assert "longer than 0.5s" in res.skipped[0]["reason"]


def test_encoded_batches_are_not_kept(rerank_folder, shapes_scorer, monkeypatch):
    """Regression (peak memory grew ~31 KB per image): each batch's embeddings are scored and
    dropped; the old code kept a view per row, so every batch tensor stayed alive to the end."""
    import weakref
    d, _ = rerank_folder
    real, refs, alive = shapes_scorer.encode_pixel_batch, [], []

    def spy(px):
        alive.append(sum(r() is not None for r in refs[:-1]))   # all but the batch being handed over
        out = real(px)
        refs.append(weakref.ref(out.untyped_storage()))          # a row view would keep the storage
        return out
    monkeypatch.setattr(shapes_scorer, "encode_pixel_batch", spy)
    res = rerank([d], "a red shape", shapes_scorer, top_k=3, batch_size=4)
    assert len(refs) >= 8 and alive == [0] * len(refs) and len(res.results) == 3
    files, n = sorted(d.glob("0*.png")), len(refs)
    e = embed_files(files, shapes_scorer, batch_size=4)
    assert len(refs) > n + 1 and alive == [0] * len(refs) and e.embeddings.shape[0] == len(files)


def test_cache_read_in_chunks_warm_equals_cold_and_top_k(rerank_folder, shapes_scorer, tmp_path, monkeypatch):
    import clipkit.core.embedding as emb
    d, _ = rerank_folder
    monkeypatch.setattr(emb, "CACHE_CHUNK", 5)
    cache = EmbeddingCache(tmp_path / "c", shapes_scorer.spec, shapes_scorer.preprocess)
    sizes, lookup = [], cache.lookup
    monkeypatch.setattr(cache, "lookup", lambda keys: sizes.append(len(keys)) or lookup(keys))
    cold = rerank([d], "a blue circle", shapes_scorer, cache=cache, batch_size=7)
    warm = rerank([d], "a blue circle", shapes_scorer, cache=cache, batch_size=7)
    assert cold.cached == 0 and warm.cached == 32 and max(sizes) <= 5
    assert [(r.path, r.score, r.rank) for r in warm.results] == [(r.path, r.score, r.rank) for r in cold.results]
    assert warm.skipped == cold.skipped and len(warm.skipped) == 4       # bad files remembered by the cache
    # top-K is the prefix of the full ranking, also when K splits the dup_a/dup_b tie
    k = next(n for n, r in enumerate(warm.results) if "dup_a" in r.path) + 1
    top = rerank([d], "a blue circle", shapes_scorer, top_k=k, cache=cache)
    assert [r.path for r in top.results] == [r.path for r in warm.results[:k]]
    assert top.candidates == warm.candidates == 36
    sheet = Image.open(top.contact_sheet(tmp_path / "s.png", limit=2))
    assert sheet.size[1] < 200                                          # one row of 2 thumbnails
