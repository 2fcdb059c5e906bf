"""A tiny Shapes index shared by the search tests (folder + file list + webdataset shard)."""
from __future__ import annotations

import pytest

from search_helpers import make_images, render, scene  # noqa: E402


@pytest.fixture(scope="session")
def scorer(shapes_scorer):
    return shapes_scorer


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(root, folder, shard, list file): 12 folder images (+ a duplicate, a caption sidecar, a bad
    file), a shard of 6 samples with captions (+ one without an image), a list naming 2 files."""
    from clipkit.search.sources import pil_bytes, write_shard
    root = tmp_path_factory.mktemp("search_corpus")
    folder = root / "photos"
    paths = make_images(folder)
    (folder / "dup_a.png").write_bytes(paths[0].read_bytes())
    (folder / "dup_b.png").write_bytes(paths[0].read_bytes())
    (folder / "img01.txt").write_text("a red circle, top right\n")
    (folder / "broken.png").write_bytes(b"not an image")
    extra = render([scene("circle", "blue", "top"), scene("square", "red", "bottom"),
                    scene("triangle", "yellow", "left"), scene("circle", "green", "right"),
                    scene("square", "blue", "center"), scene("circle", "red", "center", "small")])
    shard = write_shard(root / "shard-000.tar", {
        **{f"s{i:03d}": {"png": pil_bytes(im), "txt": f"shard sample {i}".encode()} for i, im in enumerate(extra)},
        "s999": {"txt": b"a caption without an image"}})
    others = root / "others"
    others.mkdir()
    for i, im in enumerate(render([scene("triangle", "red", "top"), scene("square", "green", "left")])):
        im.save(others / f"o{i}.png")
    lst = root / "list.txt"
    lst.write_text("# two more files\nothers/o0.png\tfrom the list\nothers/o1.png\nothers/missing.png\n")
    return root, folder, shard, lst


@pytest.fixture(scope="session")
def built(corpus, scorer, tmp_path_factory):
    """The corpus indexed once (read-only for the tests that use it)."""
    from clipkit.core.cache import open_cache
    from clipkit.search import build_index
    root, folder, shard, lst = corpus
    out = tmp_path_factory.mktemp("idx") / "photos.idx"
    cache = open_cache(tmp_path_factory.mktemp("cache"), scorer.spec, scorer.preprocess)
    res = build_index([folder, shard, lst], out, scorer, cache=cache, batch_size=8)
    cache.close()
    return out, res
