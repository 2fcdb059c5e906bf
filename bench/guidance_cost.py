"""Cost of CLIP guidance: seconds per step and peak memory, guided vs unguided, in one run.

    python bench/guidance_cost.py [--steps 25] [--n 4] [--threads 1]

Arms (each measured in its own subprocess, so peak RSS is per arm):
  pixel  : the bundled 32x32 Shapes DDPM (DDIM) unguided; guided on x_t by the noise-aware
           `shapes-noised` CLIP (the default); guided on the x0 estimate by the clean `shapes` CLIP with
           x0-only gradients; the same through the UNet (grad_mode="unet");
  latent : a tiny random Stable-Diffusion-style pipeline (UNet2DConditionModel + AutoencoderKL +
           CLIPTextModel, 32x32 images, built from configs in tests/helpers.py): CFG only, CFG + CLIP
           guidance (x0 mode, gradient through the VAE decoder), CFG + CLIP through the UNet as well.
Both kinds run through the one generate path (``clipkit.guidance.pipeline.generate``): every image
sampled alone (its own seed), then scored by the CLIP. Each arm samples N images once to warm up,
then times the same run again.
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
ARMS = ["pixel/unguided", "pixel/xt", "pixel/x0", "pixel/unet", "latent/cfg", "latent/cfg+clip-x0", "latent/cfg+clip-unet"]


def run_arm(arm: str, steps: int, n: int) -> dict:
    import torch

    from clipkit.core.scorer import load_scorer
    kind, mode = arm.split("/")
    if kind == "pixel":
        from clipkit.guidance.pipeline import generate
        scorer = load_scorer("shapes-noised" if mode == "xt" else "shapes", device="cpu")   # xt: the default
        scale = 0.0 if mode == "unguided" else 0.2

        def once():
            generate("a red circle at the top left", n=n, seed=0, steps=steps, clip_scale=scale,
                     grad_mode="unet" if mode == "unet" else "x0", clip=scorer)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_openclip_dir, make_sd_components

        from clipkit.guidance.latent import LatentDiffusion
        from clipkit.guidance.pipeline import generate
        tmp = Path(tempfile.mkdtemp())
        pipe = LatentDiffusion(make_sd_components(tmp / "tok"))
        scorer = load_scorer(str(make_openclip_dir(tmp / "clip")), device="cpu")
        # every step guided, normalised x0 steps of RMS 0.5, 4 views, applied to the sample
        guide = dict(clip_scale=0.0) if mode == "cfg" else \
            dict(clip_scale=0.5, views=4, guide_stop=0.0, apply="sample",
                 grad_mode="unet" if mode.endswith("unet") else "x0")

        def once():
            generate(["a red circle", "a blue square"], n=n // 2, seed=0, steps=steps, cfg_scale=7.5,
                     diffusion=pipe, clip=scorer, **guide)
    once()
    t = time.perf_counter()
    once()
    wall = time.perf_counter() - t
    return {"arm": arm, "images": n, "steps": steps, "s_per_image": wall / n, "s_per_step": wall / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(run_arm(args.arm, args.steps, args.n)))
        return
    rows = []
    for arm in ARMS:
        p = subprocess.run([sys.executable, __file__, "--arm", arm, "--steps", str(args.steps), "--n", str(args.n),
                            "--threads", str(args.threads)], capture_output=True, text=True)
        if p.returncode:
            print(f"{arm}: failed\n{p.stderr[-1500:]}")
            continue
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = {r["arm"].split("/")[0]: r["s_per_step"] for r in rows if r["arm"] in ("pixel/unguided", "latent/cfg")}
    print(f"# guidance cost: {args.n} images x {args.steps} DDIM steps per arm, {args.threads} torch thread(s)\n")
    print("| arm | s/image | s/step (all images) | x vs unguided | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["s_per_step"] / base[r["arm"].split("/")[0]]
        print(f"| {r['arm']} | {r['s_per_image']:.2f} | {r['s_per_step']:.3f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
