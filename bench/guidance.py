"""CLIP-guided vs unguided sampling of the bundled Shapes diffusion model, judged by the oracle.

    python bench/guidance.py [--prompts 50] [--prompt-seed 0] [--seed 0] [--name-shape] [--steps 25]
                             [--noise-clip SPEC] [--judge-clip SPEC ...] [--configs NAME ...] [--save DIR]

Configs named ``x0*`` guide the x0 estimate with the bundled clean CLIP (``shapes``). Configs named
``xt-*`` guide with ``target="xt"``: the CLIP sees the noisy x_t itself (GLIDE-style), so they use a
noise-aware CLIP, --noise-clip (default: the bundled ``shapes-noised``). ``xt-bundled-*`` configs guide
x_t with the clean bundled CLIP (ablation: the x_t target without noise-aware training).

Prompts name a colour and a position ("a red shape at the top left"; with --name-shape also a shape:
"a red circle at the top left"; with --two, two such objects joined by "and"), drawn with
random.Random(--prompt-seed); every arm uses the same sampling seeds (--seed).

The headline is **strict success**, judged as a person would (``oracle.strict_match``): exactly the
objects the prompt names, each with every named attribute right, and nothing else. The **lenient**
column (what earlier reports called success) counts an image when *some* object has the first named
colour and position, extra objects allowed. Also printed: the object-count histogram, the colour
histogram of all objects found, the guiding CLIP's cosine, each --judge-clip's cosine (use CLIPs that
did not guide, e.g. one trained from scratch with another seed), and seconds per image.
--save DIR writes one PNG grid per config (10 per row, prompt order).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from clipkit.core.objectives import ClipTarget
from clipkit.core.registry import bundled_path
from clipkit.core.scorer import load_scorer
from clipkit.guidance.sampling import sample
from clipkit.guidance.wrapper import GuidanceConfig, GuidedDenoiser
from collections import Counter

from clipkit.shapes.oracle import matches, read_attributes, strict_match
from clipkit.shapes.world import AT, COLOR_NAMES, POSITIONS, SHAPES

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
    "xt-step0.2-v4-stop0.1": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.1, apply="sample", target="xt"),
    "xt-sigma0.2-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, apply="sample", target="xt",
                                     step_schedule="sigma"),
    "xt-sigma0.3-v4": GuidanceConfig(scale=1.0, x0_step=0.3, views=4, apply="sample", target="xt",
                                     step_schedule="sigma"),
    "xt-step0.4-v4": GuidanceConfig(scale=1.0, x0_step=0.4, views=4, apply="sample", target="xt"),
    "xt-step0.2-v1": GuidanceConfig(scale=1.0, x0_step=0.2, views=1, apply="sample", target="xt"),
    "xt-scale300-output-v4": GuidanceConfig(scale=300.0, views=4, apply="output", target="xt"),
    "xt-scale1000-output-v4": GuidanceConfig(scale=1000.0, views=4, apply="output", target="xt",
                                             grad_rms_max=None),
    "xt-bundled-sigma0.2-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, apply="sample", target="xt",
                                             step_schedule="sigma"),
    "xt-bundled-step0.2-v4": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, apply="sample", target="xt"),
    "xt-bundled-step0.2-v4-stop0.3": GuidanceConfig(scale=1.0, x0_step=0.2, views=4, stop=0.3, apply="sample",
                                                    target="xt"),
}


def draw_prompts(n: int, seed: int, name_shape: bool = False, two: bool = False):
    """``n`` prompts drawn with random.Random(seed) -> (expected objects per prompt, prompt texts)."""
    rng = random.Random(seed)

    def draw_object(taken=()):
        pos = rng.choice([p for p in POSITIONS if p not in taken])
        e = {"color": rng.choice(COLOR_NAMES), "position": pos}
        if name_shape:
            e["shape"] = rng.choice(SHAPES)
        return e
    expected, texts = [], []
    for _ in range(n):
        objs = [draw_object()]
        if two:
            objs.append(draw_object(taken={objs[0]["position"]}))
        expected.append(objs)
        texts.append(" and ".join(f"a {e['color']} {e.get('shape', 'shape')} {AT[e['position']]}" for e in objs))
    return expected, texts


def main():
    from diffusers import DDIMScheduler, DDPMPipeline
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    ap.add_argument("--seed", type=int, default=0, help="first sampling seed (batch i uses seed + i)")
    ap.add_argument("--name-shape", action="store_true", help="prompts also name a shape")
    ap.add_argument("--two", action="store_true", help="two-object prompts ('... on the left and ... on the right')")
    ap.add_argument("--judge-clip", nargs="*", default=[], help="CLIPs that report a cosine but never guide")
    ap.add_argument("--noise-clip", default="shapes-noised", help="guiding CLIP of the xt-* configs (noise-aware)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--save", default=None, help="write one PNG grid per config into this folder")
    args = ap.parse_args()
    pipe = DDPMPipeline.from_pretrained(bundled_path("shapes", "diffusion"))
    unet = pipe.unet.eval().requires_grad_(False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    scorer = load_scorer("shapes", device="cpu")
    judges = [load_scorer(j, device="cpu") for j in args.judge_clip]
    noise_scorer = load_scorer(args.noise_clip, device="cpu")
    expected, texts = draw_prompts(args.prompts, args.prompt_seed, args.name_shape, args.two)
    model = lambda x, t: unet(x, t).sample  # noqa: E731
    print(f"# guidance benchmark: {args.prompts} {'two' if args.two else 'single'}-object prompts (prompt seed "
          f"{args.prompt_seed}, sampling seed {args.seed}), DDIM {args.steps} steps, 32x32, CPU "
          f"({torch.get_num_threads()} threads); x0* guided by shapes, xt-* by {args.noise_clip}\n")
    jcols = "".join(f" {j} cos |" for j in args.judge_clip)
    print(f"| config | **strict** (exactly the named objects, all attributes) | lenient (some object has the "
          f"first colour+position) | objects found 0/1/2/3+ | guide cos |{jcols} s/image |\n"
          "|---|---|---|---|---|" + "---|" * len(judges) + "---|")
    colours = {}
    for name in args.configs:
        cfg = CONFIGS[name]
        xt = cfg is not None and cfg.target == "xt" and not name.startswith("xt-bundled")
        guide_scorer = noise_scorer if xt else scorer
        strict = lenient = 0
        counts, colours[name] = Counter(), Counter()
        grid = []
        cos_g, cos_j, t0 = [], [[] for _ in judges], time.time()
        for i in range(0, len(texts), args.batch):
            tb, eb = texts[i:i + args.batch], expected[i:i + args.batch]
            tg = guide_scorer.text_embeddings(tb)[:, None, :]
            guide = None if cfg is None else GuidedDenoiser(model, sched, ClipTarget(guide_scorer, tg), cfg,
                                                            generator=torch.Generator().manual_seed(1000 + i))
            x = sample(guide or model, sched, (len(tb), 3, 32, 32), args.steps,
                       torch.Generator().manual_seed(args.seed + i),
                       after_step=guide.after_step if guide is not None else None)
            img = ((x + 1) / 2).clamp(0, 1)
            for objs, im in zip(eb, img):
                found = read_attributes(im)
                strict += strict_match(found, objs)
                lenient += matches(found, {k: objs[0][k] for k in ("color", "position")})
                counts[min(len(found), 3)] += 1
                colours[name].update(o.color for o in found)
            grid.append(img)
            cos_g.append((guide_scorer.encode_images(img) * tg[:, 0]).sum(-1))
            for j, judge in enumerate(judges):
                cos_j[j].append((judge.encode_images(img) * judge.encode_texts(tb)).sum(-1))
        dt = (time.time() - t0) / len(texts)
        n = len(texts)
        jc = "".join(f" {torch.cat(c).mean():.3f} |" for c in cos_j)
        hist = "/".join(str(counts[k]) for k in range(4))
        print(f"| {name} | **{strict / n:.2f} ({strict}/{n})** | {lenient / n:.2f} ({lenient}/{n}) | {hist} | "
              f"{torch.cat(cos_g).mean():.3f} |{jc} {dt:.2f} |", flush=True)
        if args.save:
            from pathlib import Path

            from torchvision.utils import save_image
            Path(args.save).mkdir(parents=True, exist_ok=True)
            save_image(torch.cat(grid), str(Path(args.save) / f"{name}.png"), nrow=10, padding=2, pad_value=0.5)


    print("\ncolours of the objects found (all samples):")
    for name, c in colours.items():
        total = sum(c.values()) or 1
        print(f"  {name}: " + ", ".join(f"{k} {v / total:.2f}" for k, v in c.most_common()))


if __name__ == "__main__":
    main()
