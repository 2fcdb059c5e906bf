"""Index build / add / search / dedup on tiny Shapes indexes, through the library and the CLI."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from clipkit.cli.main import cli
from clipkit.core.errors import InputError, ModelLoadError
from clipkit.search import IndexReader, add_to_index, build_index, dedup, search
from clipkit.search.store import read_manifest

from search_helpers import make_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def runner():
    return CliRunner()


def test_build_sources_captions_and_skipped(built, corpus):
    out, res = built
    root, folder, shard, lst = corpus
    r = IndexReader(out)
    items = {it.path: it for it in r.alive_items()}
    # 12 images + 2 duplicates in the folder, 6 shard samples, 2 listed files
    assert res.items == len(r) == len(items) == 22
    assert items[str(folder / "img01.png")].caption == "a red circle, top right"       # sidecar .txt
    assert items[f"{shard}#s002.png"].caption == "shard sample 2"                      # webdataset .txt
    assert items[str(root / "others" / "o0.png")].caption == "from the list"           # list TAB caption
    skipped = {os.path.basename(s["path"]): s["reason"] for s in res.skipped}
    assert set(skipped) == {"broken.png", "missing.png", "shard-000.tar#s999"}
    assert "not an image" in skipped["broken.png"] and "no image in sample" in skipped["shard-000.tar#s999"]
    m = read_manifest(out)
    assert m.model == "shapes" and m.dim == 128 and m.ann["factory"] == "IVF1,SQfp16"
    assert m.preprocess["image_size"] == 48
    emb = np.load(out / m.segments[0].emb, mmap_mode="r")
    assert emb.dtype == np.float16 and emb.shape == (22, 128)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)


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


def test_add_new_removed_changed(tmp_path, scorer):
    from PIL import Image
    folder = tmp_path / "imgs"
    paths = make_images(folder, 3, 3)
    idx = tmp_path / "i.idx"
    build_index([folder], idx, scorer, batch_size=4)
    gen1 = read_manifest(idx)
    # one removed, one changed in place, two new files (one in a new folder given as a source)
    paths[0].unlink()
    Image.open(paths[1]).rotate(90).save(paths[1])
    newdir = tmp_path / "new"
    make_images(newdir, 1, 1)
    res = add_to_index(idx, [newdir], scorer, batch_size=4)
    assert (res.removed, res.reembedded, res.added, res.items) == (2, 1, 3, 7)
    assert not res.retrained and res.generation == 2
    m = read_manifest(idx)
    assert len(m.segments) == 2 and m.segments[0] == gen1.segments[0]           # appended, not rebuilt
    r = IndexReader(idx)
    paths_now = {it.path for it in r.alive_items()}
    assert str(paths[0]) not in paths_now and str(paths[1]) in paths_now and len(paths_now) == 7
    hit = search(r, scorer, image=str(paths[1]), top_k=1).results[0]
    assert hit.path == str(paths[1]) and hit.score == pytest.approx(1, abs=2e-3)   # the new version
    # nothing changed: no new generation
    again = add_to_index(idx, [newdir], scorer, batch_size=4)
    assert again.generation == 2 and again.added == 0
    # an interrupted add (rows and files of gen 3 but no manifest) is undone by the next writer
    from clipkit.search.store import open_meta, recover
    (idx / "emb-000009.npy").write_bytes(b"partial")
    db = open_meta(idx, writable=True)
    db.execute("INSERT INTO items VALUES (99, 'ghost', 'ghost', 0, 0, NULL, NULL, NULL, 3, NULL)")
    recover(idx, read_manifest(idx), db)
    assert db.execute("SELECT COUNT(*) FROM items WHERE id = 99").fetchone()[0] == 0
    db.close()
    assert not (idx / "emb-000009.npy").exists()


def test_add_retrains_when_outgrown(tmp_path):
    from clipkit.search import AnnConfig, VectorSource
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = tmp_path / "v.idx"
    r1 = build_index(None, idx, vectors=VectorSource(x[:100]), config=AnnConfig(flat_max=150))
    assert r1.structure == "IVF1,SQfp16"
    r2 = add_to_index(idx, vectors=VectorSource(x[100:140]))
    assert not r2.retrained and r2.structure == "IVF1,SQfp16"
    r3 = add_to_index(idx, vectors=VectorSource(x[140:]))
    assert r3.retrained and r3.structure.startswith("IVF") and r3.structure != "IVF1,SQfp16"
    r = IndexReader(idx)
    assert sorted(os.listdir(idx)) == sorted(["manifest.json", "meta.sqlite", ".lock", "ivf-g3.faiss"]
                                             + [f"emb-00000{i}.npy" for i in (1, 2, 3)]
                                             + [f"codes-00000{i}-g3.npy" for i in (1, 2, 3)])
    assert search(r, item=250, top_k=1).results[0].id == 250


def test_build_is_resumable_and_atomic(tmp_path, scorer):
    """A build interrupted after two batches leaves no index; the rerun takes those from the cache."""
    from clipkit.core.cache import open_cache
    folder = tmp_path / "imgs"
    make_images(folder, 6, 10)
    idx = tmp_path / "r.idx"
    cache = open_cache(tmp_path / "cache", scorer.spec, scorer.preprocess)

    def interrupted(it, total):
        for n, batch in enumerate(it):
            if n == 2:
                raise KeyboardInterrupt
            yield batch
    with pytest.raises(KeyboardInterrupt):
        build_index([folder], idx, scorer, cache=cache, batch_size=4, progress=interrupted)
    assert not idx.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".r.idx")]
    res = build_index([folder], idx, scorer, cache=cache, batch_size=4)
    assert res.cached == 8 and res.items == 16
    with pytest.raises(InputError, match="refusing to overwrite"):
        build_index([folder], idx, scorer, cache=cache)
    cache.close()
    with pytest.raises(InputError, match="is \\(or contains\\) the source"):
        build_index([folder], folder, scorer, overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.md").write_text("mine")
    with pytest.raises(InputError, match="not a clipkit index"):
        build_index([folder], tmp_path / "notes", scorer, overwrite=True)
    assert (tmp_path / "notes" / "keep.md").read_text() == "mine"


def test_dedup_groups(built, corpus, tmp_path):
    out, _ = built
    _, folder, _, _ = corpus
    r = IndexReader(out)
    res = dedup(r, 0.999)
    groups = [[os.path.basename(it.path) for it in g.items] for g in res.groups]
    assert ["dup_a.png", "dup_b.png", "img00.png"] in [sorted(g) for g in groups]
    g = next(g for g in res.groups if any("dup_a" in it.path for it in g.items))
    assert g.items[0].score == pytest.approx(1, abs=1e-6) and all(it.score >= 0.999 for it in g.items)
    res.write_csv(tmp_path / "d.csv")
    rows = list(csv.reader(open(tmp_path / "d.csv")))
    assert rows[0] == ["group", "id", "score", "path"] and len(rows) == 1 + sum(len(g.items) for g in res.groups)
    sheets = res.contact_sheets(tmp_path / "sheets", r.item_image)
    assert sheets and all(p.is_file() for p in sheets)
    with pytest.raises(InputError):
        dedup(r, 1.5)


def test_bad_sources_and_index_paths(tmp_path, scorer):
    with pytest.raises(InputError, match="no such file or folder"):
        build_index([tmp_path / "nope"], tmp_path / "x.idx", scorer)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(InputError, match="not an image, a folder, a file list"):
        build_index([tmp_path / "a.csv"], tmp_path / "x.idx", scorer)
    with pytest.raises(InputError, match="not a clipkit index"):
        IndexReader(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        build_index([tmp_path / "empty"], tmp_path / "x.idx", scorer)


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_build_search_outputs(runner, tmp_path, corpus):
    root, folder, shard, lst = corpus
    idx = tmp_path / "c.idx"
    cache = ["--cache", str(tmp_path / "cache")]
    res = runner.invoke(cli, ["-q", "index", "build", str(folder), str(shard), "--out", str(idx), "--json",
                              "--workers", "0"] + cache)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["items"] == 20 and doc["structure"] == "IVF1,SQfp16"
    res = runner.invoke(cli, ["search", str(idx), "-q", "a red circle", "--top", "3", "--json",
                              "--csv", str(tmp_path / "t.csv"), "--sheet", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)                          # stdout holds only the JSON document
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3] and doc["query"] == ["a red circle"]
    assert (tmp_path / "t.png").is_file()
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows[0] == ["rank", "score", "path"] and rows[1][2] == doc["results"][0]["path"]
    # existing outputs are refused before any work; --overwrite replaces them
    res = runner.invoke(cli, ["search", str(idx), "-q", "x", "--csv", str(tmp_path / "t.csv")])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
    res = runner.invoke(cli, ["search", str(idx), "-q", "x", "--csv", str(tmp_path / "t.csv"), "--overwrite"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["search", str(idx), "--query-image", str(folder / "img03.png"), "--top", "1"])
    assert res.exit_code == 0 and "img03.png" in res.output, res.output
    res = runner.invoke(cli, ["index", "add", str(idx), str(lst), "--json"] + cache)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["added"] == 2
    res = runner.invoke(cli, ["index", "dedup", str(idx), "--threshold", "0.999", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["groups"]
    res = runner.invoke(cli, ["index", "info", str(idx), "--json"])
    assert json.loads(res.stdout)["items"] == 22


@pytest.mark.parametrize("args, message", [
    (["search", "{idx}"], "give --query TEXT or --query-image IMG"),
    (["search", "{idx}", "-q", "a", "--query-image", "x.png"], "exactly one"),
    (["search", "{idx}", "-q", "a", "--top", "0"], "--top"),
    (["search", "{idx}", "-q", "a", "--clip", "openclip:ViT-B-32/laion2b_s34b_b79k"], "was built with CLIP 'shapes'"),
    (["search", "{tmp}", "-q", "a"], "not a clipkit index"),
    (["search", "{idx}", "--query-image", "{tmp}/none.png"], "no such file"),
    (["index", "build", "{tmp}/none", "--out", "{tmp}/o.idx"], "no such file or folder"),
    (["index", "build", "{tmp}", "--out", "{tmp}/o.idx", "--max-memory", "lots"], "expected a size"),
    (["index", "build", "{tmp}", "--out", "{tmp}/o.idx", "--target-recall", "nan"], "not a finite number"),
    (["index", "build", "{tmp}", "--out", "{idx}"], "refusing to overwrite"),
    (["index", "dedup", "{idx}", "--threshold", "0"], "--threshold"),
    (["serve", "{tmp}"], "not a clipkit index"),
])
def test_cli_errors_are_one_line_exit_2(runner, built, tmp_path, args, message):
    idx, _ = built
    args = [a.format(idx=idx, tmp=tmp_path) for a in args]
    res = runner.invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.output


def test_real_subprocess(built):
    idx, _ = built
    out = subprocess.run([sys.executable, "-m", "clipkit", "-q", "search", str(idx), "-q", "a green square",
                          "--top", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["results"]) == 2
