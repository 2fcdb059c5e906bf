"""core.cache: the embedding cache resumes an interrupted run, drops stale entries, is shared by readers."""
import time

import torch
from PIL import Image

from clipkit.core.cache import EmbeddingCache
from clipkit.core.embedding import embed_files
from helpers import RERANK_BAD as BAD   # tests/ is on sys.path (conftest.py)


def test_cache_resume_and_invalidation(rerank_folder, shapes_scorer, tmp_path):
    d, _ = rerank_folder
    files = sorted(p for p in d.rglob("*.png") if p.name not in BAD)
    cache = EmbeddingCache(tmp_path / "c", shapes_scorer.spec, shapes_scorer.preprocess)
    part = embed_files(files[:10], shapes_scorer, cache=cache)           # an "interrupted" first run
    assert part.cached == 0 and len(cache) == 10
    full = embed_files(files, shapes_scorer, cache=cache)
    assert full.cached == 10 and len(cache) == len(files)
    again = embed_files(files, shapes_scorer, cache=cache)
    assert again.cached == len(files)
    assert torch.allclose(again.embeddings, full.embeddings, atol=1e-6)
    # change a file: its entry is stale and re-encoded
    victim = tmp_path / "victim.png"
    Image.open(files[0]).save(victim)
    e1 = embed_files([victim], shapes_scorer, cache=cache)
    time.sleep(0.01)
    Image.new("RGB", (64, 64), (0, 0, 255)).save(victim)
    e2 = embed_files([victim], shapes_scorer, cache=cache)
    assert e2.cached == 0 and not torch.allclose(e1.embeddings, e2.embeddings)
    # another process reading the same cache concurrently sees consistent rows
    other = EmbeddingCache(tmp_path / "c", shapes_scorer.spec, shapes_scorer.preprocess)
    assert len(other) == len(cache)
