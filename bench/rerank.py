"""Reranking: quality on Shapes, throughput and memory, measured side by side in one run.

    python bench/rerank.py [--n-quality 1000] [--n-speed 2000] [--n-memory 20000] [--parts quality,breakdown,speed,memory]

1. precision@10 (oracle-judged) of text queries naming 1, 2 or 3 attributes over 1,000 rendered
   test images (bundled CLIP).
2. Cold rerank of N JPEGs (clipkit: DataLoader workers + cache writes) vs a plain loop that opens
   each file with PIL and calls the backend's preprocess + encode one batch at a time; then a warm
   re-query of the same folder with the cache.
3. Peak RSS of a cold `clipkit rerank` at N and 10N images (separate processes).
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from clipkit.core.io import load_image
from clipkit.core.preprocess import pil_to_tensor
from clipkit.core.scorer import load_scorer
from clipkit.core.cache import EmbeddingCache
from clipkit.rerank.rank import rerank
from clipkit.shapes.oracle import read_attributes
from clipkit.shapes.render import render_scenes, to_pil
from clipkit.shapes.world import AT, COLOR_NAMES, POSITIONS, SHAPES, sample_scene, split_seed


def write_scenes(folder: Path, n: int, size: int, fmt: str, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    step = 256 if size <= 64 else 16          # the renderer supersamples 4x: keep big canvases in small batches
    for i in range(0, n, step):
        scenes = [sample_scene(split_seed("test", start + j)) for j in range(i, min(n, i + step))]
        for j, im in enumerate(to_pil(render_scenes(scenes, size))):
            im.save(folder / f"{i + j:06d}.{fmt}", quality=90) if fmt == "jpg" else im.save(folder / f"{i + j:06d}.{fmt}")


def quality(scorer, n, tmp):
    folder = tmp / "quality"
    write_scenes(folder, n, 64, "png")
    found = {str(p): read_attributes(Image.open(p)) for p in sorted(folder.glob("*.png"))}
    rng = random.Random(0)
    kinds = {
        "1 attribute (colour)": [(f"a {c} shape", {"color": c}) for c in COLOR_NAMES],
        "1 attribute (shape)": [(f"a {s}", {"shape": s}) for s in SHAPES],
        "1 attribute (position)": [(f"something {AT[p]}", {"position": p}) for p in POSITIONS],
    }
    two, three = [], []
    for _ in range(20):
        c, s, p = rng.choice(COLOR_NAMES), rng.choice(SHAPES), rng.choice(POSITIONS)
        two.append((f"a {c} {s}", {"color": c, "shape": s}))
        three.append((f"a {c} {s} {AT[p]}", {"color": c, "shape": s, "position": p}))
    kinds["2 attributes (colour+shape)"] = two
    kinds["3 attributes (colour+shape+position)"] = three
    rows = []
    cache = EmbeddingCache(tmp / "qcache", scorer.spec, scorer.preprocess)
    for name, queries in kinds.items():
        precs, best = [], []
        for text, want in queries:
            res = rerank([folder], text, scorer, top_k=10, cache=cache)
            ok = lambda p: any(all(getattr(o, k) == v for k, v in want.items()) for o in found[p])  # noqa: E731
            hit = sum(ok(r.path) for r in res.results)
            relevant = sum(ok(p) for p in found)
            precs.append(hit / 10)
            best.append(min(relevant, 10) / 10)
        rows.append((name, len(queries), sum(precs) / len(precs), min(precs), sum(best) / len(best)))
    return rows


def plain_loop(scorer, files, batch):
    be, out = scorer.backend, []
    with torch.inference_mode():
        for i in range(0, len(files), batch):
            px = []
            for p in files[i:i + batch]:
                try:
                    px.append(pil_to_tensor(load_image(p), scorer.preprocess))
                except Exception:
                    pass
            out.append(torch.nn.functional.normalize(be.encode_image(torch.stack(px)).float(), dim=-1))
    return torch.cat(out)


def speed(scorer, n, tmp, workers, batch):
    folder = tmp / "speed"
    write_scenes(folder, n, 256, "jpg", start=50_000)
    files = sorted(folder.glob("*.jpg"))
    t = time.perf_counter()
    ref = plain_loop(scorer, files, batch)
    t_plain = time.perf_counter() - t
    cache = EmbeddingCache(tmp / "scache", scorer.spec, scorer.preprocess)
    t = time.perf_counter()
    cold = rerank([folder], "a red circle", scorer, cache=cache, num_workers=workers, batch_size=batch)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    warm = rerank([folder], "a blue square at the top", scorer, cache=cache, num_workers=workers, batch_size=batch)
    t_warm = time.perf_counter() - t
    assert warm.cached == n and len(cold.results) == n
    q = scorer.encode_texts(["a red circle"])[0]
    ref_scores = dict(zip(map(str, files), (ref @ q).tolist()))
    diff = max(abs(ref_scores[r.path] - r.score) for r in cold.results)
    return n / t_plain, n / t_cold, n / t_warm, t_cold / t_warm, diff


def breakdown(scorer, n, tmp, batch):
    """CPU time per image of each stage, to bound what any pipelining can reach on this machine."""
    folder = tmp / "speed"
    write_scenes(folder, n, 256, "jpg", start=50_000)
    files = sorted(folder.glob("*.jpg"))[:n]
    be, threads = scorer.backend, torch.get_num_threads()
    t = time.process_time()
    px = [pil_to_tensor(load_image(p), scorer.preprocess) for p in files]
    decode = (time.process_time() - t) / n * 1e3                        # CPU ms per image (one thread)
    x = torch.stack(px[:batch])
    rows = {}
    for k in sorted({1, threads}):
        torch.set_num_threads(k)
        with torch.inference_mode():
            be.encode_image(x)                                           # warm-up
            t, c = time.perf_counter(), time.process_time()
            for _ in range(5):
                be.encode_image(x)
            rows[k] = ((time.perf_counter() - t) / (5 * batch) * 1e3, (time.process_time() - c) / (5 * batch) * 1e3)
    torch.set_num_threads(threads)
    print(f"\nCPU cost per image ({n} JPEGs 256x256 -> {scorer.preprocess.image_size} px; forward at batch {batch}):\n")
    print("| stage | wall ms/image | CPU ms/image |\n|---|---|---|")
    print(f"| decode + resize + to tensor (PIL, 1 process) | {decode:.2f} | {decode:.2f} |")
    for k, (w, c) in rows.items():
        print(f"| image tower forward, {k} torch thread(s) | {w:.2f} | {c:.2f} |")
    cores = os.cpu_count()
    serial = decode + rows[threads][0]
    bound = cores / (decode + rows[1][1])
    print(f"\nplain loop (decode, then forward on {threads} threads): ~{1e3 / serial:.0f} images/s; "
          f"perfect pipelining on {cores} cores (every core busy, forward at its 1-thread cost): "
          f"<= {1e3 * bound:.0f} images/s = {serial * bound:.2f}x the plain loop")


def peak_rss(folder: Path, cache_dir: Path) -> float:
    code = ("import resource, sys; from clipkit.cli.main import cli; "
            "sys.argv=['clipkit','-q','rerank',sys.argv[1],'-q','a red circle','--top','5','--cache',sys.argv[2]];\n"
            "try:\n    cli()\nexcept SystemExit:\n    pass\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(cache_dir)], capture_output=True, text=True, check=True)
    self_kb, child_kb = map(int, out.stdout.strip().splitlines()[-1].split())
    return self_kb / 1024, child_kb / 1024


def speed_report(scorer, args, tmp):
    plain, cold, warm, ratio, diff = speed(scorer, args.n_speed, tmp, args.workers, args.batch)
    print(f"\n{args.n_speed} JPEGs (256x256), batch {args.batch}:\n")
    print("| run | images/s |\n|---|---|")
    print(f"| plain loop (PIL open + preprocess + encode per batch) | {plain:.0f} |")
    print(f"| clipkit rerank, cold ({args.workers} workers, cache writes) | {cold:.0f} ({cold / plain:.2f}x) |")
    print(f"| clipkit rerank, warm re-query (cache) | {warm:.0f} ({ratio:.0f}x faster than cold) |")
    print(f"\nmax |score difference| clipkit vs plain loop: {diff:.2e}")


def memory_report(args, tmp):
    small, big = tmp / "mem_small", tmp / "mem_big"
    write_scenes(small, args.n_memory // 10, 64, "png", start=200_000)
    write_scenes(big, args.n_memory, 64, "png", start=300_000)
    s_self, s_child = peak_rss(small, tmp / "mc1")
    b_self, b_child = peak_rss(big, tmp / "mc2")
    print("\npeak RSS of a cold `clipkit rerank` (main process VmHWM / largest DataLoader worker):\n")
    print("| images | main MB | worker MB |\n|---|---|---|")
    print(f"| {args.n_memory // 10} | {s_self:.0f} | {s_child:.0f} |")
    print(f"| {args.n_memory} | {b_self:.0f} | {b_child:.0f} |")
    per_image = (b_self - s_self) * 1024 / (args.n_memory - args.n_memory // 10)
    print(f"\nmain-process growth: {per_image:.1f} KB per extra image")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-quality", type=int, default=1000)
    ap.add_argument("--n-speed", type=int, default=2000)
    ap.add_argument("--n-memory", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--parts", default="quality,speed,memory", help="comma-separated subset to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp())
    try:
        scorer = load_scorer("shapes", device="cpu")
        print(f"# rerank benchmark (bundled CLIP; torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
        if "quality" in parts:
            print(f"precision@10 over {args.n_quality} rendered test images (oracle-judged):\n")
            print("| queries | n | mean P@10 | min P@10 | best achievable mean P@10 |\n|---|---|---|---|---|")
            for name, n, mean, mn, best in quality(scorer, args.n_quality, tmp):
                print(f"| {name} | {n} | {mean:.3f} | {mn:.2f} | {best:.3f} |")
        if "breakdown" in parts:
            breakdown(scorer, min(args.n_speed, 500), tmp, args.batch)
        if "speed" in parts:
            speed_report(scorer, args, tmp)
        if "memory" in parts:
            memory_report(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
