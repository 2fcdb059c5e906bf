"""search.query: ``search`` by text, image and item on the shared index (order, quality, ties, exact
scores against ``rerank``), and the refusal of another CLIP. Fixtures: tests/conftest.py (corpus, built)."""
import os

import pytest

from clipkit.core.errors import ModelLoadError
from clipkit.search import IndexReader, search

pytestmark = pytest.mark.usefixtures("one_thread")


def test_search_order_quality_and_ties(built, scorer, corpus):
    out, _ = built
    _, folder, shard, _ = corpus
    r = IndexReader(out)
    res = search(r, scorer, text="a red circle", top_k=22)
    scores = [h.score for h in res.results]
    assert scores == sorted(scores, reverse=True) and len(res.results) == 22
    red_circles = {"img00.png", "img01.png", "img02.png", "img03.png", "dup_a.png", "dup_b.png", "s005.png"}
    assert {os.path.basename(h.path).split("#")[-1] for h in res.results[:7]} == red_circles
    # the byte-identical duplicates tie: ordered by path, consecutive
    dup = [h for h in res.results if "dup_" in h.path]
    assert dup[0].score == pytest.approx(dup[1].score, abs=1e-6)
    assert dup[0].path < dup[1].path and dup[1].rank == dup[0].rank + 1
    # an image query finds itself first (cosine 1), the same order as an item query
    img = search(r, scorer, image=str(folder / "img03.png"), top_k=3)
    assert img.results[0].path.endswith("img03.png") and img.results[0].score == pytest.approx(1, abs=2e-3)
    it = search(r, item=img.results[0].id, top_k=3)
    assert [h.path for h in it.results] == [h.path for h in img.results]
    d = res.to_dict()
    assert set(d["results"][0]) >= {"rank", "score", "path", "id"} and d["model"] == "shapes"


def test_search_matches_exact_rerank_scores(built, scorer, corpus):
    """The index ranks like `rerank` over the same files (scores differ only by fp16 storage)."""
    from clipkit.rerank.rank import rerank
    out, _ = built
    _, folder, _, _ = corpus
    ref = rerank([folder], "a blue square", scorer)
    got = search(IndexReader(out), scorer, text="a blue square", top_k=22)
    mine = {h.path: h.score for h in got.results}
    for r in ref.results:
        assert mine[r.path] == pytest.approx(r.score, abs=2e-3)


def test_other_clip_is_refused(built, tiny_openclip_dir):
    from clipkit.core.scorer import load_scorer
    out, _ = built
    other = load_scorer(str(tiny_openclip_dir), device="cpu")
    with pytest.raises(ModelLoadError, match="was built with CLIP 'shapes'"):
        search(IndexReader(out), other, text="a red circle")
