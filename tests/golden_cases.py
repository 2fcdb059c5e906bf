"""The cases behind tests/test_golden.py: small, seeded runs of the scorer, pixel and latent guidance
and captioning, each reduced to a few numbers (a "slice", as diffusers' tests do).

``python tests/golden_cases.py`` prints the slices; they were recorded once, before the architecture
refactor of issue 13, and pasted into test_golden.py so that the refactor is shown to change no output.
"""
from __future__ import annotations

import numpy as np
import torch

PROMPT = "a red circle at the top left"


def _pix(im) -> list[float]:
    a = np.asarray(im).astype(np.float64)
    return [round(float(a.mean()), 4)] + [int(v) for v in a.reshape(-1)[::97][:8]]


def scorer_slice() -> list[float]:
    from clipkit.core.scorer import load_scorer
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import sample_scene
    s = load_scorer("shapes", device="cpu")
    x = render_scenes([sample_scene(11), sample_scene(12, n_objects=1)])
    sim = s.similarity(x, ["a red circle", "a blue square at the bottom right"])
    g = s.similarity_grad(x, ["a red circle"])
    return [round(float(v), 5) for v in sim.reshape(-1)] + [round(float(g.grad.abs().sum()), 3)]


def pixel_slice() -> list[float]:
    from clipkit.guidance.pipeline import generate
    out = []
    for opts in ({"seed": 5}, {"seed": 6, "best_of": 3}, {"seed": 5, "clip": "shapes"}):
        r = generate(PROMPT, n=1, steps=8, device="cpu", **opts)
        out += _pix(r.images[0].image) + [round(r.images[0].clip_score, 4)]
    return out


def latent_slice(sd_dir, clip_dir) -> list[float]:
    from clipkit.core.scorer import load_scorer
    from clipkit.guidance.diffusion import load_diffusion
    from clipkit.guidance.pipeline import generate
    pipe = load_diffusion(str(sd_dir), device="cpu")
    scorer = load_scorer(str(clip_dir), device="cpu")
    r = generate("a red circle", n=1, seed=2, steps=3, cfg_scale=3.0, clip_scale=200.0, clip=scorer,
                 diffusion=pipe)
    return _pix(r.images[0].image) + [round(r.images[0].clip_score, 4)]


def caption_slice() -> list:
    from clipkit.captioning.captioner import caption
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import sample_scene
    x = render_scenes([sample_scene(21), sample_scene(22)])
    out = []
    for strategy in ("beam", "greedy"):
        for r in caption(x, strategy=strategy, device="cpu"):
            out += [r.caption]
    return out


if __name__ == "__main__":
    import sys
    import tempfile
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_openclip_dir, make_sd_components, save_sd_pipeline
    torch.set_num_threads(1)
    print("SCORER =", scorer_slice())
    print("PIXEL =", pixel_slice())
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        sd = save_sd_pipeline(make_sd_components(d / "tok"), d / "sd")
        print("LATENT =", latent_slice(sd, make_openclip_dir(d / "clip")))
    print("CAPTION =", caption_slice())
