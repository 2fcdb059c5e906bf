"""Memory of CLIP guidance against the number of cutouts (issue 14): views in chunks, checkpointed.

    python bench/guidance_memory.py [--cutouts 4 32] [--steps 4] [--threads 1]

The latent path (a tiny random Stable-Diffusion-style pipeline from tests/helpers.py, 32x32 images)
guided by a random CLIP with ViT-B/32's shapes (open_clip's own config, 224 px input, built from the
config: no download), x0 mode through the VAE decoder, 4 views + C cutouts per step. Each arm runs in
its own process: "working MB" is the peak RSS of the sampling run minus the RSS just before it (the
models are loaded by then), so it is what guidance itself needs. Arms: C cutouts with the default
chunk of 8 views per CLIP forward, and C cutouts in one chunk (no checkpointing) for comparison.
Sampling goes through the one generate path (``clipkit.guidance.pipeline.generate`` with a
``LatentDiffusion`` backend), which also scores the image once at the end.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_arm(cutouts: int, chunk: int, steps: int) -> dict:
    import open_clip
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import TINY_PREPROCESS, make_sd_components

    from clipkit.core.artifacts import build_openclip, save_openclip_dir
    from clipkit.core.scorer import load_scorer
    from clipkit.guidance.latent import LatentDiffusion
    from clipkit.guidance.pipeline import generate
    tmp = Path(tempfile.mkdtemp())
    comps = make_sd_components(tmp / "tok")
    cfg = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    clip_dir = save_openclip_dir(build_openclip(cfg), cfg, {**TINY_PREPROCESS, "size": 224}, tmp / "clip")
    scorer = load_scorer(str(clip_dir), device="cpu")
    pipe = LatentDiffusion(comps, view_batch=chunk or 4 + cutouts)     # chunk 0: all views in one forward
    base = rss_mb()
    t = time.perf_counter()
    generate("a red circle", n=1, seed=0, steps=steps, cfg_scale=7.5, clip_scale=0.5, views=4, cutouts=cutouts,
             guide_stop=0.0, apply="sample", diffusion=pipe, clip=scorer)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cutouts": cutouts, "chunk": chunk, "views": 4 + cutouts, "s_per_step": wall / steps,
            "rss_before_mb": base, "peak_mb": peak, "working_mb": peak - base}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cutouts", type=int, nargs="*", default=[4, 32])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        import torch
        torch.set_num_threads(args.threads)
        c, k = map(int, args.arm.split(","))
        print(json.dumps(run_arm(c, k, args.steps)))
        return
    rows = []
    for c in args.cutouts:
        for k in (8, 0):
            p = subprocess.run([sys.executable, __file__, "--arm", f"{c},{k}", "--steps", str(args.steps),
                                "--threads", str(args.threads)], capture_output=True, text=True)
            if p.returncode:
                print(f"cutouts {c}, chunk {k}: failed\n{p.stderr[-1500:]}")
                continue
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = next((r["working_mb"] for r in rows if r["chunk"] == 8), None)
    print(f"# guidance memory: latent tiny SD + random ViT-B/32 CLIP (224 px), {args.steps} guided steps, "
          f"{args.threads} torch thread(s)\n")
    print("| cutouts | views per step | chunk (views per CLIP forward) | working MB | x vs first row | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        chunk = "8 (default, checkpointed)" if r["chunk"] else "all at once"
        print(f"| {r['cutouts']} | {r['views']} | {chunk} | {r['working_mb']:.0f} | "
              f"{r['working_mb'] / base:.2f} | {r['s_per_step']:.2f} |")


if __name__ == "__main__":
    main()
