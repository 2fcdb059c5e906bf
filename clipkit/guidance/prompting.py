"""A prompt -> what guidance optimises: weighted parts and negatives, the profile's layout (objects
placed on its grid, each guided on its own), image prompts and scorers -> one objective
(:mod:`clipkit.core.objectives`), and the texts a text-conditioned model is conditioned on."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch
from PIL import Image

from clipkit.core.backends import check_texts
from clipkit.core.errors import ImageLoadError, InputError
from clipkit.core.io import load_image
from clipkit.core.objectives import (AestheticScore, ClipTarget, Erased, PromptPart, Weighted, negative_parts,
                                     parse_weighted_prompt)
from clipkit.core.profiles import layout_of
from clipkit.guidance.config import GenerateConfig
from clipkit.guidance.wrapper import parse_cut_schedule

log = logging.getLogger(__name__)


def check_prompts(prompts, allow_empty: bool = False) -> list[str]:
    """Strings, stripped; ``allow_empty``: an empty prompt is allowed (a run guided by image prompts)."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if allow_empty and items and all(isinstance(p, str) for p in items):
        return [p.strip() for p in items]
    try:
        return [p.strip() for p in check_texts(items)]
    except InputError as e:
        raise InputError(str(e).replace("text", "prompt")) from None


def prompt_parts(prompt: str, config: GenerateConfig) -> list[PromptPart]:
    """The prompt's weighted text parts (`` | ``-separated, ``:weight``) and its negatives
    (``TEXT[:STRENGTH]``, weight -STRENGTH; ``{prompt}`` stands for each positive part)."""
    parts = parse_weighted_prompt(prompt)
    return parts + negative_parts(config.negative, parts)


def has_cutouts(config: GenerateConfig) -> bool:
    """Does guidance show the CLIP random crops (``cutouts``, or a cut schedule with some)?"""
    schedule = parse_cut_schedule(config.cut_schedule) if config.cut_schedule else ((config.views, config.cutouts),)
    return any(c > 0 for _, c in schedule)


def _layout(prompt: str, config: GenerateConfig) -> tuple[list | None, str | None]:
    """(the placed objects a layout guides one by one, None) or (None, why it guides as one text)."""
    split = layout_of(config.layout)
    if split is None:
        return None, "layout is off"
    if config.image_prompts or config.scorers:
        return None, "image prompts and scorers judge the whole image"
    if has_cutouts(config):
        return None, "a crop (cutouts) does not show the grid's cells where they are"
    parts = parse_weighted_prompt(prompt)
    if len(parts) != 1 or parts[0].weight <= 0:
        return None, "a prompt of weighted parts guides as written"
    placed = split(parts[0].text)
    if placed is None:
        return None, ("it is not two or more objects joined by 'and', each naming its own cell of the 3x3 grid "
                      "(e.g. 'a red circle at the top left and a blue square on the right')")
    return placed, None


def why_no_layout(prompt: str, config: GenerateConfig) -> str | None:
    """Why ``config.layout`` (e.g. the Shapes profile's "grid") would guide ``prompt`` as one text rather than object by object (None: it
    would not)."""
    return _layout(prompt, config)[1]


def prompt_layout(prompt: str, config: GenerateConfig) -> list | None:
    """The placed objects (the profile's layout function, e.g. :func:`clipkit.shapes.layout.split_layout`)
    that ``config.layout`` guides one by one, or None: layout off, or a prompt it does not apply to
    (:func:`why_no_layout`)."""
    return _layout(prompt, config)[0]


def check_parts(prompt: str, config: GenerateConfig) -> list[PromptPart]:
    """The parts of one prompt, or an InputError when nothing in it pulls (no positive weight)."""
    parts = prompt_parts(prompt, config)
    if not any(p.weight > 0 for p in parts) and not any(w > 0 for _, w in config.image_prompts):
        raise InputError(f"prompt {prompt!r}: nothing to guide towards: give a text or --image-prompt "
                         "with a positive weight")
    return parts


def unknown_words(prompt: str, vocab: Collection[str]) -> list[str]:
    """Words of ``prompt`` not in ``vocab`` (a profile's vocabulary), in order, without repeats."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in vocab))


def warn_unknown_words(prompts: Sequence[str], vocab: Collection[str]) -> None:
    for p in prompts:
        unknown = unknown_words(p, vocab)
        if unknown:
            log.warning("%r: the bundled Shapes models do not know %s (they know only shapes, colours, sizes and "
                        "positions); for real prompts use --profile sd, or --diffusion SPEC and --clip SPEC",
                        p, ", ".join(repr(w) for w in unknown))


def read_image(path: str, what: str) -> Image.Image:
    """A user image (an image prompt, an init image), read time-bound: a one-line InputError naming it."""
    try:
        return load_image(Path(path).expanduser())
    except ImageLoadError as e:
        raise InputError(f"{what} {path}: {e.reason}") from None


def init_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An init image -> [1, 3, size, size] in [0, 1] (resized with PIL's bicubic filter)."""
    im = image.convert("RGB").resize((size, size), Image.BICUBIC) if image.size != (size, size) else image.convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255


def build_objective(parts: Sequence[PromptPart], images: Sequence[tuple[Image.Image, float]], scorers: Sequence,
                    clip_weights: Sequence[float] | None = None, size: int | None = None,
                    heads: Sequence[tuple] = ()) -> Weighted:
    """The CLIP objective of one prompt: per CLIP, one :class:`ClipTarget` pulled towards the text
    parts and image prompts of positive weight (spherical distance; weights divided by their sum, so
    one plain prompt is the plain loss) and kept from those of negative weight (CLIP's pairwise
    classifier, :class:`ClipTarget`); an ensemble weights the CLIPs (normalised to sum 1).
    ``score_images`` of the result is the matching weighted cosine (what best-of ranks by).
    ``size``: the side of the images generated; image prompts are also kept at that size, so a CLIP
    that sees x_t compares it with the image prompt noised alike (:meth:`ClipTarget.at`)."""
    ws = list(clip_weights) if clip_weights is not None else [1.0] * len(scorers)
    if len(ws) != len(scorers):
        raise InputError(f"{len(ws)} --clip-weights for {len(scorers)} CLIPs: give one per --clip")
    items = [("text", p.text, p.weight) for p in parts] + [("image", im, w) for im, w in images]
    pos = sum(w for _, _, w in items if w > 0)
    if pos <= 0:
        raise InputError("nothing to guide towards: give a text or an image prompt with a positive weight")
    terms = []
    for scorer, cw in zip(scorers, ws):
        def embed(sel):
            texts = [x for kind, x, w in items if kind == "text" and sel(w)]
            ims = [x for kind, x, w in items if kind == "image" and sel(w)]
            emb = ([scorer.text_embeddings(texts).float().cpu()] if texts else []) + \
                  ([scorer.encode_images(ims).float().cpu()] if ims else [])
            ws_ = [w for kind, _, w in items if kind == "text" and sel(w)] + \
                  [w for kind, _, w in items if kind == "image" and sel(w)]
            # pulls are divided by their sum; each negative keeps its own weight (|w|), so "a:2" and
            # "a" meet a --negative with the same strength
            w = torch.tensor(ws_).abs()
            return (torch.cat(emb), w / pos if sel(1.0) else w) if emb else (None, None)
        targets, weights = embed(lambda w: w > 0)
        negatives, neg_weights = embed(lambda w: w < 0)
        def pixels(sel):                       # the image prompts (last rows), for noise matching
            ims = [im for kind, im, w in items if kind == "image" and sel(w)]
            return torch.cat([init_pixels(im, size) for im in ims]) if ims and size else None
        target = ClipTarget(scorer, targets, weights, negatives=negatives, negative_weights=neg_weights,
                            logit_scale=float(scorer.logit_scale), image_pixels=pixels(lambda w: w > 0),
                            negative_pixels=pixels(lambda w: w < 0))
        terms.append((cw / sum(ws), target))
    for head, w in heads:                  # image scorers (aesthetic heads) on the first CLIP's embeddings
        terms.append((w, AestheticScore(scorers[0], head)))
    return Weighted(terms)


def prompt_objective(prompt: str, parts: Sequence[PromptPart], images: Sequence[tuple[Image.Image, float]],
                     scorers: Sequence, config: GenerateConfig, size: int | None = None,
                     heads: Sequence[tuple] = ()) -> Weighted:
    """The objective of one prompt: :func:`build_objective` of its ``parts``; with a layout
    (:func:`prompt_layout`: text only), the mean over its placed objects of each one's objective (its text
    and the negatives, ``{prompt}`` standing for that object's text) on the image with the other objects' cells
    erased to the background (:class:`~clipkit.core.objectives.Erased`): each object is judged as the
    one-object image the CLIP knows how to guide, and nothing else may appear outside the other cells."""
    placed = prompt_layout(prompt, config)
    if not placed:
        return build_objective(parts, images, scorers, config.clip_weights, size, heads)
    return Weighted([(1 / len(placed), Erased(build_objective(prompt_parts(p.text, config), [], scorers,
                                                              config.clip_weights, size),
                                              [q.box for q in placed if q is not p]))
                     for p in placed])


def conditioning_text(parts: Sequence[PromptPart]) -> tuple[str, str | None]:
    """(text, negative) for a text-conditioned model: the positive parts joined with ", ", the
    negative ones likewise (None: no negative), except negatives made from the prompt (``{prompt}``):
    as the negative prompt of classifier-free guidance they would cancel the prompt itself."""
    pos = ", ".join(p.text for p in parts if p.weight > 0)
    neg = ", ".join(p.text for p in parts if p.weight < 0 and not p.templated)
    return pos, (neg or None)


def score_kind(config: "GenerateConfig", prompt: str, n_clips: int) -> str:
    """"cosine" when a prompt's score is its plain cosine under one CLIP, else "weighted" (weights,
    negatives, image prompts, scorers, a layout or an ensemble)."""
    parts = prompt_parts(prompt, config)
    plain = len(parts) == 1 and parts[0].weight > 0 and not (config.image_prompts or config.scorers) and n_clips == 1
    return "cosine" if plain and not prompt_layout(prompt, config) else "weighted"
