"""search.build: ``build_index`` (sources, captions, skipped files, resumable and atomic, bad sources) and
``add_to_index`` (new, removed and changed files; retraining when outgrown; recovery of an interrupted
add). Query, dedup and the CLI are tests/search/test_query.py, test_dedup.py, tests/cli/test_index.py."""
import os

import numpy as np
import pytest

from clipkit.core.errors import InputError
from clipkit.search import IndexReader, add_to_index, build_index, search
from clipkit.search.manifest import read_manifest
from helpers import make_images   # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


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
    from clipkit.search.meta import open_meta
    from clipkit.search.segments import recover
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
                                             + [f"lists-00000{i}-g3.npy" for i in (1, 2, 3)])
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


def to_format_1(idx):
    """Rewrite a format-2 index as clipkit wrote it before (format 1): full SQfp16 codes files beside
    the embeddings, no identity (index id, generations table, digests)."""
    import json
    import sqlite3

    from clipkit.search import ann
    m = json.loads((idx / "manifest.json").read_text())
    index = ann.deserialize((idx / m["ann"]["quantizer"]).read_bytes())
    for seg in m["segments"]:
        emb = np.load(idx / seg["emb"])
        name = f"codes-{seg['emb'][4:10]}-g1.npy"
        np.save(idx / name, ann.encode(index, emb.astype(np.float32)))
        os.unlink(idx / seg["codes"])
        seg["codes"] = name
        del seg["emb_sha256"], seg["codes_sha256"]
    for k in ("index_id", "weights", "precision"):
        del m[k]
    for k in ("quantizer_sha256", "tuned_n", "tuned_on", "trained_rows"):
        del m["ann"][k]
    del m["config"]["retune_growth"]
    m["version"] = 1
    (idx / "manifest.json").write_text(json.dumps(m))
    db = sqlite3.connect(idx / "meta.sqlite")
    db.execute("DROP TABLE generations")
    db.execute("DROP INDEX items_real")
    db.commit()
    db.close()


def test_format_1_index_opens_and_add_upgrades_it(tmp_path):
    from clipkit.search import AnnConfig, VectorSource
    from test_ann import clustered
    x = clustered(3500)
    idx = tmp_path / "old.idx"
    build_index(None, idx, vectors=VectorSource(x[:3000]), config=AnnConfig(flat_max=500))
    want = [[h.id for h in search(IndexReader(idx), vector=v, top_k=5).results] for v in x[3000:3050]]
    to_format_1(idx)
    r = IndexReader(idx)
    assert r.manifest.version == 1 and r.info()["disk_vectors_vs_raw_fp16"] > 2
    assert [[h.id for h in search(r, vector=v, top_k=5).results] for v in x[3000:3050]] == want
    res = add_to_index(idx, vectors=VectorSource(x[3000:]))
    assert not res.retrained
    m = read_manifest(idx)
    assert m.version == 2 and len(m.index_id) == 32 and all(s.lists_only for s in m.segments)
    assert not list(idx.glob("codes-*")) and IndexReader(idx).info()["disk_vectors_vs_raw_fp16"] < 1.1
    from clipkit.search import ann
    r = IndexReader(idx)
    got = np.array([[h.id for h in search(r, vector=v, top_k=5).results] for v in x[3000:3050]])
    assert (got[:, 0] == np.arange(3000, 3050)).all()                       # each finds itself now
    assert ann.recall_at(got, ann.exact_topk([(np.arange(3500), x)], x[3000:3050], 5)) >= 0.9
    assert r.verify()["ok"]
