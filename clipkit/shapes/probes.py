"""Zero-shot probes of a CLIP on the Shapes world (used by training evals and the benchmarks)."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from clipkit.shapes.world import AT, COLOR_NAMES, POSITIONS, SHAPES, SIZES, Scene
from clipkit.shapes.data import single_object_scenes
from clipkit.shapes.render import render_scenes

#: attribute -> (template, label values, how a label is phrased in the template)
PROBES = {
    "color": ("a {} shape", COLOR_NAMES, lambda v: v),
    "shape": ("a {}", SHAPES, lambda v: v),
    "size": ("a {} shape", SIZES, lambda v: v),
    "position": ("something {}", POSITIONS, lambda v: AT[v]),
}


def probe_prompts(attr: str) -> list[str]:
    tmpl, values, phrase = PROBES[attr]
    return [tmpl.format(phrase(v)) for v in values]


@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, scenes: Sequence[Scene],
                       encode_texts: Callable[[list[str]], torch.Tensor]) -> dict[str, float]:
    """Accuracy per attribute on single-object scenes. ``image_emb`` [N, D] normalised."""
    out = {}
    for attr, (_, values, _) in PROBES.items():
        txt = encode_texts(probe_prompts(attr)).to(image_emb.device)     # [L, D]
        pred = (image_emb @ txt.T).argmax(dim=1).cpu()
        truth = torch.tensor([values.index(sc.objects[0].attributes()[attr]) for sc in scenes])
        out[attr] = float((pred == truth).float().mean())
    return out


@torch.no_grad()
def reference_accuracy(scorer, n: int = 512, split: str = "test", attributes: Sequence[str] = ("color",),
                       size: int | None = None) -> dict[str, float]:
    """Zero-shot accuracy of a :class:`~clipkit.core.scorer.ClipScorer` on ``n`` single-object
    Shapes renders of ``split`` (at the model's input size): the reference task that WiSE-FT
    reports for CLIPs that started from the bundled Shapes CLIP. -> ``{"color": acc, ...}``."""
    scenes, pixels = _reference_renders(split, n, size or scorer.preprocess.image_size)
    acc = zero_shot_accuracy(scorer.encode_images(pixels), scenes, scorer.encode_texts)
    return {k: acc[k] for k in attributes}


@functools.lru_cache(maxsize=2)
def _reference_renders(split: str, n: int, size: int):
    """The reference scenes and their renders, drawn once for the several models WiSE-FT measures."""
    scenes = single_object_scenes(split, n)
    return scenes, render_scenes(scenes, size)
