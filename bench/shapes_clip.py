"""Quality of the bundled Shapes CLIP (and the oracle) on the Shapes test split.

    python bench/shapes_clip.py [--clip shapes] [--compare DIR ...] [--n 1000]

Prints markdown tables: zero-shot accuracy per attribute (clean and degraded images, and x_t: renders
noised by the DDPM forward process at step t, what a noise-aware CLIP guides on), text->image
retrieval R@1/R@10 (a hit = an image whose attributes all match the query scene), two-object probes,
and the oracle's accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

from clipkit.core.scorer import load_scorer
from clipkit.core.augment import ddpm_alphas_cumprod, gaussian_blur
from clipkit.shapes.data import single_object_scenes, two_object_scenes
from clipkit.shapes.oracle import matches, read_attributes
from clipkit.shapes.probes import zero_shot_accuracy
from clipkit.shapes.render import render_scenes
from clipkit.shapes.world import canonical_caption, sample_scene, split_seed


def degrade(x, kind, g):
    if kind == "clean":
        return x
    if kind.startswith("noise"):
        return (x + float(kind[5:]) * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur1":
        return gaussian_blur(x, torch.full((len(x),), 1.0))
    if kind.startswith("xt"):      # DDPM-noised at step t of the bundled diffusion model's schedule
        ab = ddpm_alphas_cumprod()[int(kind.split("=")[1])]
        return ((ab.sqrt() * (2 * x - 1) + (1 - ab).sqrt() * torch.randn(x.shape, generator=g) + 1) / 2)
    if kind == "lowres8":
        return F.interpolate(F.interpolate(x, size=(8, 8), mode="area"), size=x.shape[-2:], mode="bilinear")
    raise ValueError(kind)


def zero_shot_table(scorer, n):
    scenes = single_object_scenes("test", n)
    rows = []
    for size in (32, 64):
        x = render_scenes(scenes, size)
        kinds = ["clean", "noise0.1", "noise0.2", "blur1", "lowres8", "xt t=200", "xt t=400", "xt t=600"]
        for kind in (kinds if size == 32 else ["clean"]):
            xd = degrade(x, kind, torch.Generator().manual_seed(0))
            acc = zero_shot_accuracy(scorer.encode_images(xd), scenes, scorer.encode_texts)
            rows.append((f"{size}px {kind}", acc))
    counts = Counter(s.objects[0].color for s in scenes)
    return rows, min(counts.values())


def attrs_key(scene):
    return tuple(sorted(tuple(sorted(a.items())) for a in scene.attributes()))


def retrieval(scorer, n):
    scenes = [sample_scene(split_seed("test", 100_000 + i)) for i in range(n)]
    img = scorer.encode_images(render_scenes(scenes, 64))
    txt = scorer.encode_texts([canonical_caption(s) for s in scenes])
    keys = [attrs_key(s) for s in scenes]
    top = (txt @ img.T).topk(10, dim=1).indices
    r1 = sum(keys[top[i, 0]] == keys[i] for i in range(n)) / n
    r10 = sum(any(keys[j] == keys[i] for j in top[i].tolist()) for i in range(n)) / n
    return r1, r10


def two_object_probes(scorer, n):
    scenes = [s for s in two_object_scenes("test", n) if s.objects[0].row_col[1] != s.objects[1].row_col[1]]
    img = scorer.encode_images(render_scenes(scenes, 64))
    rel_ok = left_ok = 0
    for e, s in zip(img, scenes):
        a, b = sorted(s.objects, key=lambda o: o.row_col[1])        # a is left of b
        da, db = f"a {a.color} {a.shape}", f"a {b.color} {b.shape}"
        t = scorer.encode_texts([f"{da} to the left of {db}", f"{db} to the left of {da}",
                                 f"a {a.color} shape on the left", f"a {b.color} shape on the left"])
        s_ = t @ e
        rel_ok += bool(s_[0] > s_[1])
        left_ok += bool(s_[2] > s_[3]) if a.color != b.color else True
    return rel_ok / len(scenes), left_ok / len(scenes), len(scenes)


def oracle_table(n):
    rows = []
    for size in (32, 64):
        for sigma in (0.0, 0.05, 0.1):
            scenes = [sample_scene(split_seed("test", i)) for i in range(n)]
            x = render_scenes(scenes, size)
            x = (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
            ok, tot, count_ok = Counter(), 0, 0
            for s, im in zip(scenes, x):
                found = read_attributes(im)
                count_ok += len(found) == len(s.objects)
                for e in s.attributes():
                    tot += 1
                    for k in ("color", "shape", "size", "position"):
                        ok[k] += matches(found, {k: e[k], "position": e["position"]})
            rows.append((f"{size}px sigma={sigma}", {k: ok[k] / tot for k in ok}, count_ok / n))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default="shapes")
    ap.add_argument("--compare", nargs="*", default=[], help="other CLIP specs to report side by side")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--oracle-n", type=int, default=500)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# Shapes CLIP benchmark (n={args.n}; torch {torch.__version__}; {torch.get_num_threads()} threads)\n")
    for spec in [args.clip] + args.compare:
        t0 = time.time()
        sc = load_scorer(spec, device="cpu")
        rows, min_per_class = zero_shot_table(sc, args.n)
        print(f"## {spec}\n\nZero-shot accuracy, single-object test images ({args.n}; >= {min_per_class} per colour):\n")
        print("| images | colour | shape | size | position |\n|---|---|---|---|---|")
        for name, acc in rows:
            print(f"| {name} | {acc['color']:.3f} | {acc['shape']:.3f} | {acc['size']:.3f} | {acc['position']:.3f} |")
        r1, r10 = retrieval(sc, args.n)
        rel, left, m = two_object_probes(sc, args.n)
        print(f"\nText->image retrieval over {args.n} test images (1-2 objects, canonical captions): "
              f"R@1 = {r1:.3f}, R@10 = {r10:.3f}")
        print(f"Two-object probes ({m} scenes, objects in different columns): relation "
              f"'A to the left of B' vs swapped = {rel:.3f}; 'a C shape on the left' (C = left vs right colour) = {left:.3f}")
        print(f"({time.time() - t0:.0f}s)\n")
    print("## Oracle (attributes read back from pixels)\n")
    print("| renders | colour | shape | size | position | object count |\n|---|---|---|---|---|---|")
    for name, acc, cnt in oracle_table(args.oracle_n):
        print(f"| {name} | {acc['color']:.3f} | {acc['shape']:.3f} | {acc['size']:.3f} | {acc['position']:.3f} | {cnt:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
