"""CLIP-guided vs unguided sampling of the bundled Shapes diffusion model, judged by the oracle.

    python bench/guidance.py [--prompts 50] [--steps 25] [--judge-clip DIR] [--configs NAME ...]

Prompts name a colour and a position ("a red shape at the top left"); both arms use the same seeds.
Success = the oracle finds an object with that colour at that position. Also: validity (the oracle
explains every object), the guiding CLIP's cosine, an independent judge CLIP's cosine (--judge-clip,
e.g. a CLIP trained with another recipe/seed), and seconds per image.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from clipkit.core.registry import bundled_path
from clipkit.core.scorer import load_scorer
from clipkit.guidance.wrapper import GuidanceConfig, GuidedDenoiser, sample
from clipkit.shapes.oracle import matches, read_attributes
from clipkit.shapes.world import AT, COLOR_NAMES, POSITIONS

CONFIGS = {
    "unguided": None,
    "x0step0.2-sample-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.3, apply="sample"),
    "x0step0.1-sample-v4": GuidanceConfig(scale=1.0, x0_step=0.1, views=4, apply="sample"),
    "x0step0.2-sample-v1": GuidanceConfig(scale=1.0, x0_step=0.2, views=1, stop=0.3, apply="sample"),
    "x0step0.2-sample-unet": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.3, apply="sample", grad_mode="unet"),
    "x0step0.2-output-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.3, apply="output"),
}


def main():
    from diffusers import DDIMScheduler, DDPMPipeline
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--judge-clip", default=None)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=25)
    args = ap.parse_args()
    pipe = DDPMPipeline.from_pretrained(bundled_path("shapes", "diffusion"))
    unet = pipe.unet.eval().requires_grad_(False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    scorer = load_scorer("shapes", device="cpu")
    judge = load_scorer(args.judge_clip, device="cpu") if args.judge_clip else None
    rng = random.Random(0)
    prompts = [(rng.choice(COLOR_NAMES), rng.choice(POSITIONS)) for _ in range(args.prompts)]
    texts = [f"a {c} shape {AT[p]}" for c, p in prompts]
    model = lambda x, t: unet(x, t).sample  # noqa: E731
    print(f"# guidance benchmark: {args.prompts} prompts, DDIM {args.steps} steps, 32x32, CPU "
          f"({torch.get_num_threads()} threads)\n")
    print("| config | success (colour+position) | valid | guide cos | judge cos | s/image |\n|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = CONFIGS[name]
        ok = valid = 0
        cos_g, cos_j, t0 = [], [], time.time()
        for i in range(0, len(texts), args.batch):
            tb, pb = texts[i:i + args.batch], prompts[i:i + args.batch]
            tg = scorer.text_embeddings(tb)[:, None, :]
            guide = None if cfg is None else GuidedDenoiser(model, sched, scorer, tg, cfg,
                                                            generator=torch.Generator().manual_seed(1000 + i))
            x = sample(model, sched, (len(tb), 3, 32, 32), args.steps, torch.Generator().manual_seed(i), guide=guide)
            img = ((x + 1) / 2).clamp(0, 1)
            for (c, p), im in zip(pb, img):
                found = read_attributes(im)
                ok += matches(found, {"color": c, "position": p})
                valid += bool(found) and all(o.valid for o in found) and len(found) <= 2
            cos_g.append((scorer.encode_images(img) * tg[:, 0]).sum(-1))
            if judge is not None:
                cos_j.append((judge.encode_images(img) * judge.encode_texts(tb)).sum(-1))
        dt = (time.time() - t0) / len(texts)
        n = len(texts)
        jc = f"{torch.cat(cos_j).mean():.3f}" if cos_j else "-"
        print(f"| {name} | {ok / n:.3f} ({ok}/{n}) | {valid / n:.3f} | {torch.cat(cos_g).mean():.3f} | {jc} | {dt:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
