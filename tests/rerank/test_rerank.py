import csv
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipkit.cli.main import cli
from clipkit.core.errors import InputError
from clipkit.core.cache import EmbeddingCache
from clipkit.core.embedding import embed_files
from clipkit.rerank.rank import rank_texts, rerank


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
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


BAD = {"zero.png", "text.jpg", "trunc.jpg", "bomb.png"}


def test_bad_files_skipped_with_reasons(folder, shapes_scorer):
    d, _ = folder
    res = rerank([d], "a red shape", shapes_scorer)
    assert {os.path.basename(s["path"]) for s in res.skipped} == BAD
    reasons = {os.path.basename(s["path"]): s["reason"] for s in res.skipped}
    assert reasons["zero.png"] == "empty file" and "decompression" in reasons["bomb.png"]
    assert len(res.results) == 32 and res.candidates == 36
    scores = [r.score for r in res.results]
    assert scores == sorted(scores, reverse=True)
    a, b = [r for r in res.results if "dup_" in r.path]
    assert a.score == pytest.approx(b.score, abs=1e-6) and a.path < b.path and a.rank < b.rank


def test_quality_red_query_finds_red(folder, shapes_scorer):
    d, scenes = folder
    res = rerank([d], "a red shape", shapes_scorer, top_k=3)
    from clipkit.shapes.oracle import read_attributes
    for r in res.results:
        assert read_attributes(Image.open(r.path))[0].color == "red"


def test_same_results_for_batch_sizes(folder, shapes_scorer):
    d, _ = folder
    runs = [rerank([d], "a circle at the top", shapes_scorer, batch_size=bs) for bs in (1, 7, 64)]
    for other in runs[1:]:
        assert [r.path for r in other.results] == [r.path for r in runs[0].results]
        assert np.allclose([r.score for r in other.results], [r.score for r in runs[0].results], atol=1e-5)


def test_workers_that_encode_give_the_main_process_results(folder, shapes_scorer):
    """Opt-in on a CPU: forked DataLoader workers encode their own batches; same files, order, reasons
    and embeddings (1e-5) as encoding in the main process or with no workers at all."""
    from clipkit.core.embedding import EmbeddingStream, encode_in_workers
    d, _ = folder
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


def test_cache_resume_and_invalidation(folder, shapes_scorer, tmp_path):
    d, _ = folder
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


def test_decode_timeout(monkeypatch, folder, shapes_scorer):
    import clipkit.core.io as io
    d, _ = folder
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


def test_tensor_candidates_texts_and_errors(shapes_scorer, folder):
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import Scene, ShapeObject
    x = render_scenes([Scene((ShapeObject("circle", c, "large", "center"),)) for c in ("blue", "red", "green")], 32)
    res = rerank(x, "a red circle", shapes_scorer)
    assert res.results[0].path == "#1"
    t = rank_texts(folder[0] / "001.png", ["a blue thing", "a red shape", "two shapes"], shapes_scorer)
    assert len(t.results) == 3 and t.results[0].text
    with pytest.raises(InputError):
        rerank(x, None, shapes_scorer)
    with pytest.raises(InputError, match="weights"):
        rerank(x, ["a", "b"], shapes_scorer, weights=[1.0])


def test_cli_outputs(folder, tmp_path):
    d, _ = folder
    r = CliRunner()
    out_csv, sheet = tmp_path / "r.csv", tmp_path / "s.png"
    res = r.invoke(cli, ["rerank", str(d), "-q", "a red shape", "--top", "5", "--json", "--csv", str(out_csv),
                         "--sheet", str(sheet), "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [x["rank"] for x in doc["results"]] == [1, 2, 3, 4, 5] and len(doc["skipped"]) == 4
    rows = list(csv.reader(open(out_csv)))
    assert rows[0] == ["rank", "score", "path"] and len(rows) == 6
    assert Image.open(sheet).size[0] > 300
    # warm: everything from the cache
    res = r.invoke(cli, ["rerank", str(d), "-q", "a circle", "--json", "--cache", str(tmp_path / "cache")])
    assert json.loads(res.stdout)["cached"] == 32
    res = r.invoke(cli, ["rerank", str(d), "-q", "a", "-q", "b", "--json", "--no-cache"])
    assert len(json.loads(res.stdout)["rankings"]) == 2
    res = r.invoke(cli, ["rerank", str(d / "zero.png"), "-q", "a red shape", "--no-cache"])
    assert res.exit_code == 2 and "could be read" in res.stderr
    texts = tmp_path / "t.txt"
    texts.write_text("a red shape\na blue shape\n")
    res = r.invoke(cli, ["rerank", str(d / "001.png"), "--texts", str(texts), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)["results"]) == 2


@pytest.mark.slow
def test_embed_two_processes_equals_one(folder, tmp_path):
    d, _ = folder
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    base = [sys.executable, "-m", "clipkit.cli.main", "-q", "embed", str(d), "--workers", "0"]
    r1 = subprocess.run(base + ["--out", str(one)], capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "clipkit.cli.main", "-q", "embed", str(d), "--workers", "0", "--out", str(two)]
    r2 = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(one), "pt") as f1, safe_open(str(two), "pt") as f2:
        m1, m2 = f1.metadata(), f2.metadata()
    p1, p2 = json.loads(m1["paths"]), json.loads(m2["paths"])
    assert p1 == p2, ([x for x in p1 if x not in p2], [x for x in p2 if x not in p1], len(p1), len(p2))
    assert m2["processes"] == "2"
    assert len(json.loads(m1["skipped"])) == 4
    assert torch.allclose(load_file(str(one))["embeddings"], load_file(str(two))["embeddings"], atol=1e-5)


def test_encoded_batches_are_not_kept(folder, shapes_scorer, monkeypatch):
    """Regression (peak memory grew ~31 KB per image): each batch's embeddings are scored and
    dropped; the old code kept a view per row, so every batch tensor stayed alive to the end."""
    import weakref
    d, _ = folder
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


def test_cache_read_in_chunks_warm_equals_cold_and_top_k(folder, shapes_scorer, tmp_path, monkeypatch):
    import clipkit.core.embedding as emb
    d, _ = folder
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
