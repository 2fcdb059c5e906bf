"""rerank.rank: ``rerank`` (bad files skipped with reasons, order, ties, batch sizes, tensors) and
``rank_texts``, on the candidates folder of tests/conftest.py (``rerank_folder``)."""
import os

import numpy as np
import pytest
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.rerank.rank import rank_texts, rerank
from helpers import RERANK_BAD as BAD   # tests/ is on sys.path (conftest.py)


def test_bad_files_skipped_with_reasons(rerank_folder, shapes_scorer):
    d, _ = rerank_folder
    res = rerank([d], "a red shape", shapes_scorer)
    assert {os.path.basename(s["path"]) for s in res.skipped} == BAD
    reasons = {os.path.basename(s["path"]): s["reason"] for s in res.skipped}
    assert reasons["zero.png"] == "empty file" and "decompression" in reasons["bomb.png"]
    assert len(res.results) == 32 and res.candidates == 36
    scores = [r.score for r in res.results]
    assert scores == sorted(scores, reverse=True)
    a, b = [r for r in res.results if "dup_" in r.path]
    assert a.score == pytest.approx(b.score, abs=1e-6) and a.path < b.path and a.rank < b.rank


def test_quality_red_query_finds_red(rerank_folder, shapes_scorer):
    d, scenes = rerank_folder
    res = rerank([d], "a red shape", shapes_scorer, top_k=3)
    from clipkit.shapes.oracle import read_attributes
    for r in res.results:
        assert read_attributes(Image.open(r.path))[0].color == "red"


def test_same_results_for_batch_sizes(rerank_folder, shapes_scorer):
    d, _ = rerank_folder
    runs = [rerank([d], "a circle at the top", shapes_scorer, batch_size=bs) for bs in (1, 7, 64)]
    for other in runs[1:]:
        assert [r.path for r in other.results] == [r.path for r in runs[0].results]
        assert np.allclose([r.score for r in other.results], [r.score for r in runs[0].results], atol=1e-5)


def test_tensor_candidates_texts_and_errors(shapes_scorer, rerank_folder):
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import Scene, ShapeObject
    x = render_scenes([Scene((ShapeObject("circle", c, "large", "center"),)) for c in ("blue", "red", "green")], 32)
    res = rerank(x, "a red circle", shapes_scorer)
    assert res.results[0].path == "#1"
    t = rank_texts(rerank_folder[0] / "001.png", ["a blue thing", "a red shape", "two shapes"], shapes_scorer)
    assert len(t.results) == 3 and t.results[0].text
    with pytest.raises(InputError):
        rerank(x, None, shapes_scorer)
    with pytest.raises(InputError, match="weights"):
        rerank(x, ["a", "b"], shapes_scorer, weights=[1.0])


