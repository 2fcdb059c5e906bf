"""A grid of prompts x seeds, unguided vs CLIP-guided, from the bundled Shapes models.

    python bench/guidance_grid.py --out docs/guidance_grid.png [--seeds 4] [--steps 25]

Each cell is judged strictly by the oracle: a green frame when the image holds exactly one object,
of the prompt's colour at the prompt's position; red otherwise. Same seeds in both halves (the
unguided sample of a seed is the starting point the guided one departs from). Guided = one sample
of `clipkit generate`'s bundled default: the noise-aware `shapes-noised` CLIP guiding x_t, step 0.2,
4 views, DDIM 25, with the profile's count guard (negative "{prompt} and another shape:4").
"""
from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = [("red", "top left"), ("green", "center"), ("blue", "bottom right"),
           ("yellow", "left"), ("magenta", "top"), ("cyan", "bottom left")]


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipkit.core.scorer import load_scorer
    from clipkit.guidance.pipeline import generate
    from clipkit.shapes.profile import SHAPES
    from clipkit.shapes.oracle import read_attributes, strict_match
    from clipkit.shapes.world import AT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/guidance_grid.png"))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    scorer = load_scorer("shapes-noised", device="cpu")     # the bundled profile's guide (x_t, noise-aware)
    rows, hits = [], {"unguided": 0, "guided": 0}
    for color, pos in PROMPTS:
        prompt = f"a {color} shape {AT[pos]}"
        row = []
        for arm, scale in (("unguided", 0.0), ("guided", 0.2)):
            negative = list(SHAPES.negative) if scale else []
            res = generate(prompt, n=args.seeds, seed=0, steps=args.steps, clip_scale=scale, clip=scorer,
                           negative=negative)
            for im in sorted(res.images, key=lambda g: g.seed):
                ok = strict_match(read_attributes(im.image), [{"color": color, "position": pos}])
                hits[arm] += ok
                row.append((arm, im.image, ok))
        rows.append((prompt, row))
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)))
    for r, (prompt, row) in enumerate(rows):
        for c, (arm, im, ok) in enumerate(row):
            ax = axes[r, c]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("limegreen" if ok else "red")
                side.set_linewidth(2.5)
            if r == 0:
                ax.set_title(f"{arm}\nseed {c % args.seeds}", fontsize=7)
        axes[r, 0].set_ylabel(prompt.replace(" shape", "\n"), fontsize=7)
    total = len(rows) * args.seeds
    fig.suptitle(f"bundled Shapes DDPM, DDIM {args.steps} steps: unguided {hits['unguided']}/{total} vs "
                 f"CLIP-guided {hits['guided']}/{total} right (the oracle, strictly: one object, its colour at its "
                 f"position; green frame)", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"{args.out}: unguided {hits['unguided']}/{total}, guided {hits['guided']}/{total}")


if __name__ == "__main__":
    main()
