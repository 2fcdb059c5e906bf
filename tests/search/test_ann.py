"""The ANN part on synthetic unit vectors: structure choice under a budget, recall, appends, storage."""
import numpy as np
import pytest

from clipkit.core.errors import InputError
from clipkit.search import AnnConfig, IndexReader, VectorSource, add_to_index, build_index, search
from clipkit.search import ann
from clipkit.search.manifest import read_manifest


def clustered(n, d=32, clusters=64, noise=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_plan_under_memory_budget():
    d, n = 512, 1_000_000
    assert ann.plan_index(10_000, d, AnnConfig()).factory == "IVF1,SQfp16"            # small: exact scan
    p = ann.plan_index(n, d, AnnConfig())
    assert p.factory == "IVF1024,SQfp16" and p.kind == "ivf"
    raw = n * d * 2
    assert p.memory <= 1.3 * raw                                                   # codes + ids + centroids
    assert ann.plan_index(n, d, AnnConfig(max_memory=int(0.6 * raw))).codec == "SQ8"
    assert ann.plan_index(n, d, AnnConfig(max_memory=200 << 20)).codec == "PQ4"    # 128 bytes/vector
    assert ann.plan_index(n, d, AnnConfig(max_memory=60 << 20)).codec == "PQ16"
    with pytest.raises(InputError, match="too small"):
        ann.plan_index(n, d, AnnConfig(max_memory=1 << 20))
    with pytest.raises(InputError, match="unknown codec"):
        ann.plan_index(n, d, AnnConfig(codec="LSH"))
    assert ann.default_nlist(100_000) == 256 and ann.default_nlist(50) == 1
    assert all(n >= ann.MIN_POINTS_PER_CENTROID * ann.default_nlist(n) for n in (100, 5_000, 77_777, 10 ** 8))


def test_ivf_recall_and_append_without_retraining(tmp_path):
    x = clustered(12_050)
    x, q = x[:12_000], x[12_000:]                        # held-out queries from the same distribution
    idx = tmp_path / "v.idx"
    res = build_index(None, idx, vectors=VectorSource(x[:10_000]), config=AnnConfig(flat_max=1000))
    assert res.structure == "IVF128,SQfp16" and res.recall >= 0.95

    def recall(reader, n):
        truth = ann.exact_topk([(np.arange(n), x[:n])], q, 10)
        found = np.array([[h.id for h in search(reader, vector=v, top_k=10).results] for v in q])
        return ann.recall_at(found, truth)
    before = recall(IndexReader(idx), 10_000)
    assert before >= 0.95
    add = add_to_index(idx, vectors=VectorSource(x[10_000:]))
    assert not add.retrained and add.items == 12_000
    after = recall(IndexReader(idx), 12_000)
    assert after >= 0.95 and after >= before - 0.03
    r = IndexReader(idx)
    assert r.memory_bytes() == 12_000 * (32 * 2 + 8) + 128 * 32 * 4          # codes + ids + centroids


def test_scores_and_order_are_exact(tmp_path):
    """Candidates are re-scored exactly; ties (identical vectors) are ordered by name."""
    x = clustered(500)
    x[10] = x[3]
    names = [f"n{i:03d}" for i in range(500)]
    names[3], names[10] = "b-second", "a-first"
    build_index(None, tmp_path / "t.idx", vectors=VectorSource(x, names=names))
    r = IndexReader(tmp_path / "t.idx")
    hits = search(r, vector=x[3], top_k=5).results
    assert [h.path for h in hits[:2]] == ["a-first", "b-second"] and hits[0].score == hits[1].score
    emb = r.vectors([h.id for h in hits]).astype(np.float64)
    q = x[3] / np.linalg.norm(x[3])
    assert [h.score for h in hits] == pytest.approx((emb @ q).tolist(), abs=1e-6)
    with pytest.raises(InputError, match="16-d query"):
        search(r, vector=np.ones(16), top_k=3)
    with pytest.raises(InputError, match="no item"):
        search(r, item=10_000)


def test_budget_and_config_are_saved(tmp_path):
    cfg = AnnConfig(max_memory=10 << 20, flat_max=100, target_recall=0.9)
    build_index(None, tmp_path / "c.idx", vectors=VectorSource(clustered(3000)), config=cfg)
    m = read_manifest(tmp_path / "c.idx")
    assert AnnConfig.from_dict(m.config) == cfg
    assert m.ann["kind"] == "ivf" and m.ann["recall"] >= 0.9 and m.model == "vectors"
    with pytest.raises(InputError):
        AnnConfig(target_recall=0).validate()


def test_one_copy_of_the_embeddings(tmp_path):
    """SQfp16 codes are the fp16 embeddings: the index stores the list numbers only (issue 25)."""
    import faiss
    x = clustered(5000)
    build_index(None, tmp_path / "o.idx", vectors=VectorSource(x), config=AnnConfig(flat_max=1000))
    m = read_manifest(tmp_path / "o.idx")
    assert m.ann["codec"] == "SQfp16" and m.ann["nlist"] > 1
    files = {p.name: p.stat().st_size for p in (tmp_path / "o.idx").iterdir()}
    assert not [f for f in files if f.startswith("codes-")] and "lists-000001-g1.npy" in files
    raw = x.shape[0] * x.shape[1] * 2
    vectors = files["emb-000001.npy"] + files["lists-000001-g1.npy"]
    assert vectors <= 1.1 * raw, (vectors, raw)
    # the assembled structure holds exactly the stored fp16 rows (the code bodies come from them)
    r = IndexReader(tmp_path / "o.idx")
    ivf = faiss.extract_index_ivf(r.ann_index())
    emb = np.load(tmp_path / "o.idx" / "emb-000001.npy")
    for li in range(ivf.nlist):
        n = ivf.invlists.list_size(li)
        if n:
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(li), n).copy()
            codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(li), n * ivf.code_size).copy()
            assert (codes.reshape(n, -1) == emb[ids].view(np.uint8)).all()
    assert r.info()["disk_vectors_vs_raw_fp16"] <= 1.1
    hits = search(r, vector=x[7], top_k=3).results
    assert hits[0].id == 7 and hits[0].score == pytest.approx(1, abs=2e-3)


def test_nprobe_is_tuned_on_held_out_vectors_and_retuned_when_grown(tmp_path, monkeypatch):
    """Tuning queries are vectors the k-means never saw; `add` re-tunes once the index doubled."""
    from clipkit.search import build as build_mod
    seen = {}
    train, tune = build_mod.ann.train, build_mod.ann.tune_nprobe

    def spy_train(plan, sample, seed=0):
        seen["sample"] = {v.tobytes() for v in np.asarray(sample, np.float32)}
        return train(plan, sample, seed)

    def spy_tune(index, queries, *a, **k):
        seen.setdefault("queries", []).append({v.tobytes() for v in np.asarray(queries, np.float32)})
        return tune(index, queries, *a, **k)
    monkeypatch.setattr(build_mod.ann, "train", spy_train)
    monkeypatch.setattr(build_mod.ann, "tune_nprobe", spy_tune)
    x = clustered(22_000, seed=3)
    idx = tmp_path / "t.idx"
    res = build_index(None, idx, vectors=VectorSource(x[:10_000]), config=AnnConfig(flat_max=1000))
    m = read_manifest(idx)
    assert m.ann["tuned_on"] == "held-out vectors" and m.ann["tuned_n"] == 10_000
    assert len(seen["queries"][0]) >= 400 and not seen["queries"][0] & seen["sample"]
    assert res.recall >= 0.95
    small = add_to_index(idx, vectors=VectorSource(x[10_000:12_000]))         # +20%: no re-tuning
    assert small.recall is None and not small.retrained and len(seen["queries"]) == 1
    grown = add_to_index(idx, vectors=VectorSource(x[12_000:]))                # 2.2x: re-tuned, not retrained
    assert not grown.retrained and grown.recall is not None and grown.recall >= 0.95
    m = read_manifest(idx)
    assert m.ann["tuned_n"] == 22_000 and m.ann["recall"] == pytest.approx(grown.recall, abs=1e-4)
    assert all(int(v) >= 0 for v in [m.ann["nprobe"]])
