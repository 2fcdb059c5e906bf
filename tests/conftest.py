import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _clipkit_logs_reach_caplog():
    """An in-process CLI run (CliRunner) configures logging for a terminal: clipkit's logger stops
    propagating and the root logger goes quiet. Undo that before each test so ``caplog`` sees
    library warnings whatever ran before."""
    import logging
    lg = logging.getLogger("clipkit")
    lg.handlers[:] = []
    lg.propagate = True
    lg.setLevel(logging.NOTSET)
    logging.getLogger().setLevel(logging.WARNING)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared, busy CPU two OpenMP threads stall
    tiny convolutions 5-100x; results do not depend on it. Use with ``pytestmark =
    pytest.mark.usefixtures("one_thread")`` or an autouse fixture that requests it."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_openclip_dir(tmp_path_factory):
    from helpers import make_openclip_dir
    return make_openclip_dir(tmp_path_factory.mktemp("tiny_openclip"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    from helpers import make_hf_clip_dir
    return make_hf_clip_dir(tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="session")
def shapes_scorer():
    from clipkit.core.scorer import load_scorer
    return load_scorer("shapes", device="cpu")


@pytest.fixture(scope="session", params=["openclip", "hf"])
def tiny_scorer(request, tiny_openclip_dir, tiny_hf_dir):
    from clipkit.core.scorer import load_scorer
    path = tiny_openclip_dir if request.param == "openclip" else tiny_hf_dir
    return load_scorer(str(path), device="cpu")


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory):
    """A tiny random open_clip directory (helpers.TINY_TRAIN_CFG) to fine-tune from (CLIP training tests)."""
    import torch

    from clipkit.core.artifacts import build_openclip, save_openclip_dir
    from helpers import TINY_TRAIN_CFG, TINY_TRAIN_PP
    torch.manual_seed(0)
    return str(save_openclip_dir(build_openclip(TINY_TRAIN_CFG), TINY_TRAIN_CFG, TINY_TRAIN_PP,
                                 tmp_path_factory.mktemp("init") / "m"))


@pytest.fixture()
def photos():
    """Real photographs shipped inside scikit-image's wheel (never downloaded)."""
    from PIL import Image
    from skimage import data
    return {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")}


@pytest.fixture(scope="session")
def rerank_folder(tmp_path_factory):
    """(folder, scenes): 30 one-object Shapes renders (some in sub/), two byte-identical files
    (dup_a/dup_b: a tie broken by path) and the bad files ``helpers.RERANK_BAD`` (empty, text,
    truncated JPEG, a decompression bomb). Shared read-only by the rerank, embedding, cache and CLI
    tests (session scope: the bomb PNG is slow to write)."""
    import io

    import numpy as np
    from PIL import Image

    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import sample_scene, split_seed
    d = tmp_path_factory.mktemp("cands")
    (d / "sub").mkdir()
    scenes = [sample_scene(split_seed("test", i), n_objects=1) for i in range(30)]
    for i, (s, im) in enumerate(zip(scenes, render_pil(scenes, 64))):
        im.save(d / ("sub" if i % 4 == 0 else ".") / f"{i:03d}.png")
    im.save(d / "dup_a.png")          # two identical files: a tie broken by path
    im.save(d / "dup_b.png")
    # the bad files
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "trunc.jpg").write_bytes(buf.getvalue()[:300])
    Image.new("1", (10_000, 10_000)).save(d / "bomb.png")     # 100M pixels > the 89M guard
    return d, scenes


# ---- search: a tiny Shapes corpus (folder + file list + webdataset shard) and its index ----------------

@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(root, folder, shard, list file): 12 folder images (+ a duplicate, a caption sidecar, a bad
    file), a shard of 6 samples with captions (+ one without an image), a list naming 2 files."""
    from clipkit.search.sources import pil_bytes, write_shard
    from helpers import make_images, render, scene
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
def built(corpus, shapes_scorer, tmp_path_factory):
    """The corpus indexed once with the Shapes CLIP (read-only for the tests that use it)."""
    scorer = shapes_scorer
    from clipkit.core.cache import open_cache
    from clipkit.search import build_index
    root, folder, shard, lst = corpus
    out = tmp_path_factory.mktemp("idx") / "photos.idx"
    cache = open_cache(tmp_path_factory.mktemp("cache"), scorer.spec, scorer.preprocess)
    res = build_index([folder, shard, lst], out, scorer, cache=cache, batch_size=8)
    cache.close()
    return out, res
