"""Guidance v2 controls on the bundled Shapes world, judged by the oracle (issue 14).

    OMP_NUM_THREADS=1 python bench/controls.py [--samples 40] [--seed 5000] [--only negative image init ensemble]
                                               [--save DIR]

Every arm is `clipkit.guidance.pipeline.generate` with the bundled defaults plus one control; the
oracle (never a guiding CLIP) judges each sample:

* **negative**: "a shape at the top left", with and without ``--negative "a red shape"``: the share
  of samples holding a red object (target <= 2% with the negative), and the share with an object at
  the top left (the prompt still obeyed).
* **image**: ``--image-prompt`` of a render of a random one-object scene (drawn with its own seed,
  not from the training stream), no text: the oracle reads the render's colour and position
  (lenient: some object; strict: exactly one object, and its shape too).
* **init**: ``--init-image`` of a blue square at the bottom right, ``--strength 0.5``, prompt "a green
  square at the bottom right": exactly one object, a green square at the bottom right.
* **ensemble**: single-object prompts guided by `shapes-noised`, by `shapes` (the clean CLIP, also on
  x_t), and by both at once (weights 1, 1): strict and lenient success.

Same sampling seeds in every arm of a block. Prints one table per block; --save writes PNG grids.
"""
from __future__ import annotations

import argparse
import functools
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipkit.core.scorer import load_scorer
from clipkit.guidance.config import steps_for_strength
from clipkit.guidance.diffusion import load_diffusion
from clipkit.guidance.pipeline import generate
from clipkit.shapes.oracle import matches, read_attributes, strict_match
from clipkit.shapes.render import render_scenes
from clipkit.shapes.world import COLOR_NAMES, POSITIONS, SHAPES, Scene, ShapeObject

from guidance import draw_prompts          # bench/ is the script's folder: on sys.path


def pixels(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


@functools.lru_cache(maxsize=None)
def load(spec: str):
    return load_scorer(spec, device="cpu")


def save_render(scene: Scene, path: Path) -> Path:
    x = render_scenes([scene])[0]
    Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return path


class Block:
    def __init__(self, name: str, save: Path | None):
        self.name, self.save, self.rows = name, save, []

    def arm(self, label: str, images: list[Image.Image], judge, seconds: float):
        found = [read_attributes(pixels(im)) for im in images]
        verdicts = [judge(f, i) for i, f in enumerate(found)]
        self.rows.append((label, verdicts, found, seconds / max(1, len(images))))
        if self.save:
            grid = Image.new("RGB", (34 * 10, 34 * ((len(images) + 9) // 10)))
            for i, im in enumerate(images):
                grid.paste(im, (34 * (i % 10), 34 * (i // 10)))
            grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(
                self.save / f"{self.name}-{label.replace(' ', '_').replace('/', '_')}.png")

    def print(self, columns: list[str]):
        print(f"\n### {self.name}\n")
        print("| arm | " + " | ".join(columns) + " | objects 0/1/2/3+ | s/image |")
        print("|---|" + "---|" * (len(columns) + 2))
        for label, verdicts, found, s in self.rows:
            n = len(verdicts)
            cells = [f"{sum(v[c] for v in verdicts) / n:.2f} ({sum(v[c] for v in verdicts)}/{n})" for c in columns]
            h = [sum(1 for f in found if min(len(f), 3) == k) for k in range(4)]
            print(f"| {label} | " + " | ".join(cells) + f" | {'/'.join(map(str, h))} | {s:.2f} |", flush=True)


def run(prompt, n, seed, **kw):
    t0 = time.time()
    r = generate(prompt, n=n, seed=seed, device="cpu", **kw)
    return sorted(r.images, key=lambda g: g.seed), time.time() - t0


def negative(args, pipe, guide, save):
    b = Block("negative", save)
    prompt = "a shape at the top left"
    for label, neg in (("no negative", []), ('--negative "a red shape"', ["a red shape"])):
        ims, s = run(prompt, args.samples, args.seed, diffusion=pipe, clip=guide, negative=neg)
        b.arm(label, [g.image for g in ims],
              lambda f, i: {"red object": any(o.color == "red" for o in f),
                            "object at the top left": any(o.position == "top left" for o in f),
                            "one object at the top left, not red": len(f) == 1 and f[0].position == "top left"
                            and f[0].color != "red"}, s)
    b.print(["red object", "object at the top left", "one object at the top left, not red"])


def image_prompt(args, pipe, guide, save, tmp: Path):
    b = Block("image prompt", save)
    rng = random.Random(args.seed)
    scenes = [Scene((ShapeObject(rng.choice(SHAPES), rng.choice(COLOR_NAMES), "large", rng.choice(POSITIONS)),))
              for _ in range(args.samples)]
    for label, best_of in (("--image-prompt RENDER (no text)", 1), ("the same, --best-of 3 (by cosine)", 3)):
        ims, total = [], 0.0
        for i, sc in enumerate(scenes):
            path = save_render(sc, tmp / f"scene{i}.png")
            clip = [load(c) for c in args.image_clip] if args.image_clip else guide
            got, s = run("", 1, args.seed + 3 * i, diffusion=pipe, clip=clip, best_of=best_of,
                         image_prompts=[[str(path), 1.0]], guide_target=args.image_target)
            ims.append(got[0].image)
            total += s

        def judge(f, i):
            o = scenes[i].objects[0]
            want = [{"color": o.color, "position": o.position}]
            return {"colour + position (lenient)": matches(f, want[0]),
                    "strict: one object, colour + position": strict_match(f, want),
                    "strict + shape": strict_match(f, [{**want[0], "shape": o.shape}])}
        b.arm(label, ims, judge, total)
    b.print(["colour + position (lenient)", "strict: one object, colour + position", "strict + shape"])


def init_image(args, pipe, guide, save, tmp: Path):
    b = Block("init image", save)
    path = save_render(Scene((ShapeObject("square", "blue", "large", "bottom right"),)), tmp / "blue.png")
    prompt = "a green square at the bottom right"
    want = [{"color": "green", "shape": "square", "position": "bottom right"}]
    judge = lambda f, i: {"strict": strict_match(f, want), "lenient": matches(f, want[0]),  # noqa: E731
                          "blue left": any(o.color == "blue" for o in f)}
    init = {"init_image": str(path), "strength": 0.5}
    # what `clipkit generate PROMPT --init-image blue.png --strength 0.5` does on the bundled profile
    cli = {**init, "clip": [guide, load("shapes")], "steps": steps_for_strength(25, 0.5), "guide_target": "xt",
           "negative": ["{prompt} and another shape:4"]}
    for label, kw in (("text only (no init image)", {"clip": guide}),
                      ("API defaults: shapes-noised, 25-step schedule (12 run)", {**init, "clip": guide}),
                      ("CLI default, one sample: shapes-noised + shapes, 25 run, count guard", cli),
                      ("CLI default: the same, best of 3 by caption", {**cli, "best_of": 3, "select": caption()})):
        if kw.get("best_of", 1) > 1:      # per image, as `-n 1 --best-of 3` (candidates seed + 3i ...)
            got = [run(prompt, 1, args.seed + 3 * i, diffusion=pipe, **kw) for i in range(args.samples)]
            ims, s = [g[0][0] for g in got], sum(g[1] for g in got)
        else:
            ims, s = run(prompt, args.samples, args.seed, diffusion=pipe, **kw)
        b.arm(label, [g.image for g in ims], judge, s)
    b.print(["strict", "lenient", "blue left"])


def caption():
    from clipkit.captioning.captioner import CaptionEndSelector, load_captioner
    return CaptionEndSelector(load_captioner("shapes", device="cpu"))


def ensemble(args, pipe, guide, save):
    b = Block("ensemble", save)
    clean = load_scorer("shapes", device="cpu")
    expected, texts = draw_prompts(args.samples, args.seed, name_shape=True)
    for label, clip in (("shapes-noised", guide), ("shapes (clean)", clean), ("both, weights 1,1", [guide, clean])):
        ims, total = [], 0.0
        for i, p in enumerate(texts):
            got, s = run(p, 1, args.seed + i, diffusion=pipe, clip=clip, guide_target="xt")
            ims.append(got[0].image)
            total += s
        b.arm(label, ims, lambda f, i: {"strict": strict_match(f, expected[i]),
                                        "lenient": matches(f, {k: expected[i][0][k] for k in ("color", "position")})},
              total)
    b.print(["strict", "lenient"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--only", nargs="*", default=["negative", "image", "init", "ensemble"])
    ap.add_argument("--save", type=Path)
    ap.add_argument("--image-clip", nargs="*", default=None,
                    help="CLIP(s) for the image-prompt block (default: shapes-noised; several: an ensemble)")
    ap.add_argument("--image-target", default="auto", help="guide target for the image-prompt block")
    args = ap.parse_args()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    pipe = load_diffusion("shapes", device="cpu")
    guide = load_scorer("shapes-noised", device="cpu")
    print(f"# controls: {args.samples} samples per arm, seeds {args.seed}+, default generate settings "
          f"(DDIM 25, shapes-noised on x_t unless stated), {torch.get_num_threads()} torch thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            if name == "negative":
                negative(args, pipe, guide, args.save)
            elif name == "image":
                image_prompt(args, pipe, guide, args.save, Path(tmp))
            elif name == "init":
                init_image(args, pipe, guide, args.save, Path(tmp))
            elif name == "ensemble":
                ensemble(args, pipe, guide, args.save)


if __name__ == "__main__":
    main()
