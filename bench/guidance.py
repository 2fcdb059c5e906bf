"""CLIP-guided vs unguided sampling of the bundled Shapes diffusion model, judged by the oracle.

    python bench/guidance.py [--prompts 50] [--steps 25] [--judge-clip DIR] [--configs NAME ...]
                             [--noise-clip DIR]

Configs named ``xt-*`` guide with ``target="xt"``: the CLIP sees the noisy x_t itself (GLIDE-style), so
they need a noise-aware CLIP (``clipkit train clip --init shapes --noise-aware``), given by --noise-clip
(default: the bundled CLIP). ``xt-bundled-*`` configs always guide with the bundled CLIP (ablation: the
x_t target without noise-aware training).

Prompts name a colour and a position ("a red shape at the top left"); both arms use the same seeds.
Success = the oracle finds an object with that colour at that position. Also: validity (the oracle
explains every object, at most two), strict success (success in a valid image), the guiding CLIP's
cosine, an independent judge CLIP's cosine (--judge-clip, e.g. a CLIP trained with another recipe/seed),
and seconds per image. --save DIR writes one PNG grid per config (10 per row, prompt order).
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
    # noise-aware CLIP on x_t (no x0 estimate, no UNet backprop)
    "xt-step0.1-v4": GuidanceConfig(scale=1.0, x0_step=0.1, views=4, apply="sample", target="xt"),
    "xt-step0.2-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, apply="sample", target="xt"),
    "xt-step0.2-v4-stop0.3": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.3, apply="sample", target="xt"),
    "xt-step0.4-v4": GuidanceConfig(scale=1.0, x0_step=0.4, views=4, apply="sample", target="xt"),
    "xt-step0.2-v1": GuidanceConfig(scale=1.0, x0_step=0.2, views=1, apply="sample", target="xt"),
    "xt-scale300-output-v4": GuidanceConfig(scale=300.0, views=4, apply="output", target="xt"),
    "xt-scale1000-output-v4": GuidanceConfig(scale=1000.0, views=4, apply="output", target="xt",
                                             grad_rms_max=None),
    "xt-bundled-step0.2-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, apply="sample", target="xt"),
    "xt-bundled-step0.2-v4-stop0.3": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.3, apply="sample",
                                                    target="xt"),
}


def main():
    from diffusers import DDIMScheduler, DDPMPipeline
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--judge-clip", default=None)
    ap.add_argument("--noise-clip", default=None, help="guiding CLIP of the xt-* configs (noise-aware)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--save", default=None, help="write one PNG grid per config into this folder")
    args = ap.parse_args()
    pipe = DDPMPipeline.from_pretrained(bundled_path("shapes", "diffusion"))
    unet = pipe.unet.eval().requires_grad_(False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    scorer = load_scorer("shapes", device="cpu")
    judge = load_scorer(args.judge_clip, device="cpu") if args.judge_clip else None
    noise_scorer = load_scorer(args.noise_clip, device="cpu") if args.noise_clip else scorer
    rng = random.Random(0)
    prompts = [(rng.choice(COLOR_NAMES), rng.choice(POSITIONS)) for _ in range(args.prompts)]
    texts = [f"a {c} shape {AT[p]}" for c, p in prompts]
    model = lambda x, t: unet(x, t).sample  # noqa: E731
    print(f"# guidance benchmark: {args.prompts} prompts, DDIM {args.steps} steps, 32x32, CPU "
          f"({torch.get_num_threads()} threads); xt-* guided by {args.noise_clip or 'the bundled CLIP'}\n")
    print("| config | success (colour+position) | valid | strict success | guide cos | judge cos | s/image |\n"
          "|---|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = CONFIGS[name]
        xt = cfg is not None and cfg.target == "xt" and not name.startswith("xt-bundled")
        guide_scorer = noise_scorer if xt else scorer
        ok = valid = strict = 0
        grid = []
        cos_g, cos_j, t0 = [], [], time.time()
        for i in range(0, len(texts), args.batch):
            tb, pb = texts[i:i + args.batch], prompts[i:i + args.batch]
            tg = guide_scorer.text_embeddings(tb)[:, None, :]
            guide = None if cfg is None else GuidedDenoiser(model, sched, guide_scorer, tg, cfg,
                                                            generator=torch.Generator().manual_seed(1000 + i))
            x = sample(model, sched, (len(tb), 3, 32, 32), args.steps, torch.Generator().manual_seed(i), guide=guide)
            img = ((x + 1) / 2).clamp(0, 1)
            for (c, p), im in zip(pb, img):
                found = read_attributes(im)
                hit = matches(found, {"color": c, "position": p})
                good = bool(found) and all(o.valid for o in found) and len(found) <= 2
                ok, valid, strict = ok + hit, valid + good, strict + (hit and good)
            grid.append(img)
            cos_g.append((guide_scorer.encode_images(img) * tg[:, 0]).sum(-1))
            if judge is not None:
                cos_j.append((judge.encode_images(img) * judge.encode_texts(tb)).sum(-1))
        dt = (time.time() - t0) / len(texts)
        n = len(texts)
        jc = f"{torch.cat(cos_j).mean():.3f}" if cos_j else "-"
        print(f"| {name} | {ok / n:.3f} ({ok}/{n}) | {valid / n:.3f} | {strict / n:.3f} ({strict}/{n}) | "
              f"{torch.cat(cos_g).mean():.3f} | {jc} | {dt:.2f} |", flush=True)
        if args.save:
            from pathlib import Path

            from torchvision.utils import save_image
            Path(args.save).mkdir(parents=True, exist_ok=True)
            save_image(torch.cat(grid), str(Path(args.save) / f"{name}.png"), nrow=10, padding=2, pad_value=0.5)


if __name__ == "__main__":
    main()
