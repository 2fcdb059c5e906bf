"""Search at scale: build time, memory, latency and recall of the index; the web page's latency.

    python bench/search.py --n 1000000 [--dim 512] [--queries 1000] [--data uneven] [--json out.json]
    python bench/search.py --page 100000            # HTTP query -> first results, 100k index

Data: synthetic L2-normalised vectors with cluster structure (1,000 clusters on a 32-d manifold
mapped into 512-d, see ``clustered``; ``--data uneven``: 2,000 clusters of uneven size and spread,
see ``uneven``). Queries are held-out points of the same generator. Exact search = brute force over
the fp32 vectors.

1. ``build``: ``build_index`` from the vectors (fp16 segment, k-means, encoding, nprobe tuning, files).
2. ``memory``: bytes of the FAISS structure in RAM (codes + ids + centroids) vs the raw fp16 size,
   and what opening the index adds to a fresh process (anonymous RSS; the fp16 segments are
   memory-mapped file pages on top, shared and evictable).
3. ``latency``: one query at a time through ``search_vectors`` (FAISS + exact re-scoring of the
   candidates + SQLite metadata + ordering), p50/p99; FAISS alone beside it.
4. ``recall@10`` vs exact search, on the held-out queries, beside the recall the build's nprobe
   tuning promised (``tuned_recall``, measured on vectors of the index outside the k-means sample).
5. ``add``: 10% more vectors with ``add_to_index`` (no retraining) vs the build time; recall after.
6. ``--page N``: an index of N 128-d vectors recorded as the bundled ``shapes`` CLIP's, served by
   ``clipkit.search.server`` on a real socket: GET /api/search?q=TEXT (text encoding + search +
   JSON of the first page of 24) and ?id=N (item query), p50/p99 over 200 requests each.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def clustered(n: int, dim: int, seed: int, latent: int = 32, clusters: int = 1000, spread: float = 0.7,
              noise: float = 0.2, chunk: int = 100_000) -> np.ndarray:
    """[n, dim] fp32 unit vectors with cluster structure on a low-dimensional manifold: a latent point
    is one of ``clusters`` centres in R^latent plus ``spread`` * N(0, I), mapped into R^dim by one
    fixed random linear map, plus ``noise`` * N(0, I/dim), normalised. (Isotropic clusters directly
    in 512-d are too easy for an IVF: nprobe 1-2 reaches recall 0.99; this needs ~32 of 256 lists at
    100k, closer to what real embeddings need.) The centres and the map are the same for every seed."""
    cen = np.random.default_rng(12345)
    w = cen.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    c = cen.standard_normal((clusters, latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        z = c[rng.integers(0, clusters, b - a)] + spread * rng.standard_normal((b - a, latent)).astype(np.float32)
        x = z @ w + noise * rng.standard_normal((b - a, dim)).astype(np.float32) / np.sqrt(dim)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def uneven(n: int, dim: int, seed: int, latent: int = 28, clusters: int = 2000, chunk: int = 100_000) -> np.ndarray:
    """Like :func:`clustered`, closer to CLIP image embeddings: 2,000 clusters of uneven size (Zipf-like
    weights) and uneven spread (log-normal, 0.3-1.5), on a 28-d manifold mapped into R^dim. The
    centres, weights, spreads and the map are the same for every seed."""
    cen = np.random.default_rng(54321)
    w = cen.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    c = cen.standard_normal((clusters, latent)).astype(np.float32)
    p = 1.0 / np.arange(1, clusters + 1) ** 0.8
    p /= p.sum()
    spread = np.clip(np.exp(cen.normal(np.log(0.7), 0.4, clusters)), 0.3, 1.5).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        k = rng.choice(clusters, b - a, p=p)
        z = c[k] + spread[k, None] * rng.standard_normal((b - a, latent)).astype(np.float32)
        x = z @ w + 0.2 * rng.standard_normal((b - a, dim)).astype(np.float32) / np.sqrt(dim)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def disk_mb(idx: Path) -> dict:
    """MB on disk by kind (by file name, so that any index format is measured the same way)."""
    kinds = {"emb-": "embeddings", "codes-": "codes", "lists-": "codes", "ivf-": "quantizer", "meta.": "metadata"}
    out = dict.fromkeys(["embeddings", "codes", "quantizer", "metadata"], 0.0)
    for f in idx.iterdir():
        k = next((v for p, v in kinds.items() if f.name.startswith(p)), None)
        if k:
            out[k] += f.stat().st_size / 2 ** 20
    return {k: round(v, 1) for k, v in out.items()}


def exact(x: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    from clipkit.search import ann
    return ann.exact_topk(((np.arange(a, b), x[a:b]) for a, b in ann.batches(len(x), 65536)), q, k)


def pct(v, p):
    return float(np.percentile(np.asarray(v) * 1e3, p))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


OPEN_RSS = """
import sys, time
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) / 1024
from clipkit.search import IndexReader
from clipkit.search.query import search_vectors
base = anon()
t = time.perf_counter()
r = IndexReader(sys.argv[1])
r.ann_index()
dt = time.perf_counter() - t
search_vectors(r, r.vectors([0])[0], 10)
print(round(anon() - base), round(dt, 2))
"""


def open_in_fresh_process(idx: Path) -> tuple[int, float]:
    """(anonymous memory in MB that opening the index adds to a fresh process, seconds to open)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", OPEN_RSS, str(idx)], capture_output=True, text=True, check=True)
    mb, s = out.stdout.split()
    return int(mb), float(s)


def bench_index(n: int, dim: int, nq: int, root: Path, data: str = "clustered") -> dict:
    from clipkit.search import IndexReader, VectorSource, add_to_index, ann, build_index
    from clipkit.search.query import search_vectors
    import faiss
    out: dict = {"n": n, "dim": dim, "queries": nq, "threads": faiss.omp_get_max_threads(), "data": data}
    t = time.perf_counter()
    gen = {"clustered": clustered, "uneven": uneven}[data]
    x = gen(n, dim, seed=1)
    extra = gen(n // 10, dim, seed=2)
    q = gen(nq, dim, seed=3)
    out["data_s"] = round(time.perf_counter() - t, 1)
    idx = root / "bench.idx"

    # 1. build
    t = time.perf_counter()
    res = build_index(None, idx, vectors=VectorSource(x))
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["structure"], out["nprobe"], out["tuned_recall"] = res.structure, res.nprobe, res.recall
    print(f"build {out['build_s']} s: {res.structure}, nprobe {res.nprobe} (tuned recall {res.recall})", flush=True)
    out["disk_build_mb"] = disk_mb(idx)
    raw = n * dim * 2
    out["disk_vectors_vs_raw_fp16"] = round((out["disk_build_mb"]["embeddings"] + out["disk_build_mb"]["codes"])
                                            * 2 ** 20 / raw, 3)
    print(f"disk after the build: {out['disk_build_mb']} MB; embeddings + codes = "
          f"x{out['disk_vectors_vs_raw_fp16']} raw fp16", flush=True)

    # 2. memory
    t = time.perf_counter()
    reader = IndexReader(idx)
    mem = reader.memory_bytes()
    out["open_s"] = round(time.perf_counter() - t, 2)
    raw = n * dim * 2
    out.update(memory_mb=round(mem / 2 ** 20, 1), raw_fp16_mb=round(raw / 2 ** 20, 1),
               memory_ratio=round(mem / raw, 3), rss_peak_mb=round(rss_mb()))
    out["open_rss_mb"], out["open_fresh_s"] = open_in_fresh_process(idx)
    print(f"memory {out['memory_mb']} MB vs raw fp16 {out['raw_fp16_mb']} MB = x{out['memory_ratio']}; "
          f"a fresh process that opens it grows by {out['open_rss_mb']} MB (anonymous) in {out['open_fresh_s']} s",
          flush=True)

    # 3-4. latency and recall
    truth = exact(x, q)
    index = reader.ann_index()
    params = faiss.SearchParametersIVF(nprobe=reader.nprobe)
    for v in q[:20]:                                                    # warm-up
        search_vectors(reader, v, 10)
    lat, found = [], []
    for v in q:
        t = time.perf_counter()
        hits = search_vectors(reader, v, 10)
        lat.append(time.perf_counter() - t)
        found.append([h.id for h in hits] + [-1] * (10 - len(hits)))
    raw_lat = []
    for v in q:
        t = time.perf_counter()
        index.search(v[None], 10, params=params)
        raw_lat.append(time.perf_counter() - t)
    out.update(p50_ms=round(pct(lat, 50), 2), p99_ms=round(pct(lat, 99), 2),
               faiss_p50_ms=round(pct(raw_lat, 50), 2), faiss_p99_ms=round(pct(raw_lat, 99), 2),
               recall_at_10=round(ann.recall_at(np.array(found), truth), 4))
    print(f"query p50 {out['p50_ms']} ms p99 {out['p99_ms']} ms (FAISS alone {out['faiss_p50_ms']}/"
          f"{out['faiss_p99_ms']}), recall@10 {out['recall_at_10']} on held-out queries "
          f"(tuning promised {out['tuned_recall']})", flush=True)
    # the cost curve: recall and latency at other nprobe values (harder data needs more lists)
    out["sweep"] = []
    for nprobe in sorted({1, 2, 4, 8, 16, 32, 64} & set(range(1, int(out["structure"][3:].split(",")[0]) + 1))):
        lat, found = [], []
        for v in q[:300]:
            t = time.perf_counter()
            hits = search_vectors(reader, v, 10, nprobe=nprobe)
            lat.append(time.perf_counter() - t)
            found.append([h.id for h in hits] + [-1] * (10 - len(hits)))
        row = {"nprobe": nprobe, "recall_at_10": round(ann.recall_at(np.array(found), truth[:300]), 4),
               "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2)}
        out["sweep"].append(row)
        print(f"  nprobe {nprobe}: recall@10 {row['recall_at_10']}, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms",
              flush=True)
    reader.close()
    del reader, index

    # 5. add 10%
    t = time.perf_counter()
    res = add_to_index(idx, vectors=VectorSource(extra))
    out["add_s"] = round(time.perf_counter() - t, 2)
    out["add_vs_build"] = round(out["add_s"] / out["build_s"], 3)
    out["add_retrained"] = res.retrained
    reader = IndexReader(idx)
    allx = np.concatenate([x, extra])
    truth = exact(allx, q)
    found = [[h.id for h in search_vectors(reader, v, 10)] for v in q]
    found = [f + [-1] * (10 - len(f)) for f in found]
    out["recall_after_add"] = round(ann.recall_at(np.array(found), truth), 4)
    print(f"add {len(extra)}: {out['add_s']} s = {out['add_vs_build']:.1%} of the build; recall@10 after "
          f"{out['recall_after_add']} (retrained: {res.retrained})", flush=True)
    out["disk_mb"] = round(sum(f.stat().st_size for f in idx.iterdir()) / 2 ** 20, 1)
    out["disk_after_add_mb"] = disk_mb(idx)
    out["rss_peak_mb"] = round(rss_mb())
    return out


def bench_page(n: int, root: Path, requests: int = 200) -> dict:
    import http.client

    from clipkit.core.scorer import load_scorer
    from clipkit.search import IndexReader, VectorSource, build_index
    from clipkit.search.server import create_app
    from clipkit.search.web import ServeConfig, make_server
    from clipkit.shapes.world import AT, COLOR_NAMES, POSITIONS, SHAPES
    scorer = load_scorer("shapes", device="cpu")
    dim = int(scorer.encode_texts(["a"]).shape[1])
    x = clustered(n, dim, seed=1)
    idx = root / "page.idx"
    t = time.perf_counter()
    build_index(None, idx, vectors=VectorSource(x), model="shapes", preprocess=scorer.preprocess.to_dict())
    build_s = time.perf_counter() - t
    app = create_app(IndexReader(idx), scorer, ServeConfig())
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port)
    texts = [f"a {c} {s} {AT[p]}" for c in COLOR_NAMES for s in SHAPES for p in POSITIONS]

    def get(url):
        t = time.perf_counter()
        conn.request("GET", url)
        r = conn.getresponse()
        body = r.read()
        dt = time.perf_counter() - t
        assert r.status == 200, body[:200]
        return dt, json.loads(body)
    for i in range(10):
        get(f"/api/search?q=warm+{i}")
    text_lat, item_lat = [], []
    for i in range(requests):
        dt, doc = get("/api/search?q=" + texts[i % len(texts)].replace(" ", "+"))
        assert len(doc["results"]) == 24
        text_lat.append(dt)
    for i in range(requests):
        dt, _ = get(f"/api/search?id={(i * 7919) % n}")
        item_lat.append(dt)
    server.shutdown()
    return {"n": n, "dim": dim, "build_s": round(build_s, 1), "structure": app.extensions["clipkit_api"].reader.manifest.ann["factory"],
            "text_p50_ms": round(pct(text_lat, 50), 1), "text_p99_ms": round(pct(text_lat, 99), 1),
            "item_p50_ms": round(pct(item_lat, 50), 1), "item_p99_ms": round(pct(item_lat, 99), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=0, help="index size for parts 1-5 (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="FAISS/BLAS threads (0: the default)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--data", choices=["clustered", "uneven"], default="clustered",
                    help="the vectors: clustered (default) or uneven (cluster sizes and spreads vary)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--page", type=int, default=0, help="index size for the page benchmark (0: skip)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args()
    if a.threads:
        import faiss
        faiss.omp_set_num_threads(a.threads)
    root = Path(a.dir or tempfile.mkdtemp(prefix="clipkit-bench-search-"))
    root.mkdir(parents=True, exist_ok=True)
    res = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    t0 = time.perf_counter()
    try:
        if a.n:
            res["index"] = bench_index(a.n, a.dim, a.queries, root, a.data)
        if a.page:
            res["page"] = bench_page(a.page, root)
            print(f"page ({a.page} items): text query p50 {res['page']['text_p50_ms']} ms, "
                  f"p99 {res['page']['text_p99_ms']} ms; item query p50 {res['page']['item_p50_ms']} ms", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
