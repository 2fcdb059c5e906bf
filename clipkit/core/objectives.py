"""Differentiable image objectives (DESIGN §6): ``objective(pixels) -> per-sample loss``.

An objective maps pixels in [0, 1], a float tensor [B, 3, H, W], to a loss [B] (lower is better).
Guidance differentiates it; evaluated without gradients the same objective ranks candidates
(best-of, rerank), so generating, selecting and reranking share one scoring vocabulary.

Building blocks, all small and composable:

* :class:`ClipTarget` — spherical (or cosine) distance from a CLIP's embedding of the pixels to
  target embeddings: text prompts (:func:`clip_text`) or image prompts (:func:`clip_image`).
* :class:`Weighted` — a weighted sum of objectives; negative weights push away (negative prompts);
  an ensemble of several CLIPs is a weighted sum of their targets.
* :class:`Views` — the mean of an objective over augmented views / cutouts of the pixels, evaluated
  in chunks under activation checkpointing so memory does not grow with the number of cuts
  (:func:`viewed` builds it for any objective).
* :class:`Erased` — an objective of the pixels with boxes erased to the background: one object of a
  layout ("A at the top left and B on the right") judged on its own.
* Regularisers: :func:`tv`, :func:`range_excess`, :func:`saturation`.
* :class:`AestheticHead` — a linear or MLP head on CLIP image embeddings in the LAION
  aesthetic-predictor layouts (``--scorer aesthetic:PATH``); its objective is the negated score.

Prompts with weights use Disco Diffusion's syntax, parts separated by `` | ``, each with an
optional ``:weight`` (:func:`parse_weighted_prompt`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from PIL import ImageDraw
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.core.io import load_image, open_regular
from clipkit.core.losses import get_loss
from clipkit.core.ranking import cosines
from clipkit.core.registry import resolve


class Objective(Protocol):
    """pixels in [0, 1] [B, 3, H, W] -> loss [B]; lower is better."""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------- weighted prompts

_WEIGHT = re.compile(r"^(?P<text>.*?)\s*:\s*(?P<w>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.S)


@dataclass(frozen=True)
class PromptPart:
    text: str
    weight: float = 1.0
    templated: bool = False         # a negative made from the prompt ({prompt}): CLIP only, never a
                                    # text-conditioned model's negative prompt (it would cancel the prompt)


#: ``TEXT:nan`` / ``TEXT:inf``: a weight that is not a number; an error, never read as text
_NONFINITE = re.compile(r"^(?P<text>.*?)\s*:(?P<w>[-+]?(?:nan|inf|infinity))\s*$", re.S | re.I)
#: a weight (or a sum of weights) above this is not a float32 number: guidance's tensors would hold inf
_MAX_WEIGHT = float(torch.finfo(torch.float32).max)
#: the `` | `` separator of prompt parts, also at either end of the prompt
_SEPARATOR = re.compile(r"(?:(?<=\s)|^)\|(?=\s|$)")


def _parse_part(raw: str) -> PromptPart:
    if _NONFINITE.match(raw):
        raise InputError(f"prompt part {raw!r}: the weight must be a finite number")
    m = _WEIGHT.match(raw)
    if m and m.group("text")[-1:].isdigit():       # "10:30" is a time, "16:9" a ratio: not weights
        m = None
    text, w = (m.group("text").strip(), float(m.group("w"))) if m else (raw, 1.0)
    if not math.isfinite(w):
        raise InputError(f"prompt part {raw!r}: the weight must be a finite number")
    if abs(w) > _MAX_WEIGHT:
        raise InputError(f"prompt part {raw!r}: the weight is too large (at most {_MAX_WEIGHT:.3g}; only "
                         "the ratios of the weights matter)")
    if not text:
        raise InputError(f"prompt part {raw!r} has a weight but no text")
    return PromptPart(text, w)


def _check_sum(parts: Sequence[PromptPart], what: str) -> list[PromptPart]:
    """Weights whose sum overflows (pulls are divided by their sum; pushes add up) are an error."""
    total = math.fsum(abs(p.weight) for p in parts)
    if not total <= _MAX_WEIGHT:
        raise InputError(f"{what}: the weights are too large (their sum {total:g} overflows; only the ratios "
                         "of the weights matter: use weights like 2 and 1)")
    return list(parts)


def parse_weighted_prompt(prompt: str) -> list[PromptPart]:
    """``"a red circle:2 | a square:-1"`` -> parts with weights (default 1).

    A part ends in ``:NUMBER`` to set its weight; any other colon belongs to the text, and so does
    a colon right after a digit ("a clock at 10:30", "16:9"). An empty (or blank) prompt gives no
    parts (a run guided by image prompts only); an empty part (``"a | "``, ``" | "``), a weight that
    is not a finite number (``":nan"``) and weights whose sum overflows are InputErrors.
    """
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        return []
    raws = [raw.strip() for raw in _SEPARATOR.split(prompt.strip())]
    if not all(raws):
        raise InputError(f"prompt {prompt!r} has an empty part: parts are texts separated by ' | '")
    return _check_sum([_parse_part(raw) for raw in raws], f"prompt {prompt!r}")


#: in a negative prompt, stands for each positive text part of the prompt
PROMPT_SLOT = "{prompt}"


def parse_negative(text: str) -> PromptPart:
    """``--negative "TEXT[:STRENGTH]"`` -> a part of weight -STRENGTH (default 1, STRENGTH > 0).
    TEXT may hold ``{prompt}`` (see :func:`negative_parts`)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"a negative prompt must be a non-empty text, got {text!r}")
    part = _parse_part(text.strip())
    if not part.weight > 0:
        raise InputError(f"negative prompt {text!r}: its :STRENGTH must be > 0 (it is pushed away with that "
                         "strength)")
    return PromptPart(part.text, -part.weight)


def negative_parts(negatives: Sequence[str], parts: Sequence[PromptPart]) -> list[PromptPart]:
    """The negatives of a prompt whose ``parts`` are given. ``{prompt}`` in a negative stands for the
    prompt's text when it is one plain part (``"{prompt} and another shape"`` keeps the image to what
    the prompt names); for a prompt of several weighted parts, or none (image prompts only), a
    templated negative is left out (a part alone is not what the image should show)."""
    out = []
    pos = [p for p in parts if p.weight > 0]
    for n in map(parse_negative, negatives):
        if PROMPT_SLOT not in n.text:
            out.append(n)
        elif len(parts) == 1 and len(pos) == 1:
            out.append(PromptPart(n.text.replace(PROMPT_SLOT, pos[0].text), n.weight, templated=True))
    _check_sum([*parts, *out], f"the prompt and its negatives ({', '.join(map(repr, negatives))})")
    return out


def parse_weighted_path(value: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` (``--image-prompt``): a trailing ``:NUMBER`` is the weight, default 1."""
    m = _WEIGHT.match(value)
    if m and m.group("text"):
        w = float(m.group("w"))
        if not math.isfinite(w):
            raise InputError(f"{value!r}: the weight must be a finite number")
        return m.group("text"), w
    return value, 1.0


# ---------------------------------------------------------------- CLIP targets

@dataclass
class ClipTarget:
    """Distance from ``scorer``'s embedding of the pixels to ``targets`` ([M, D], or [B, M, D] per
    sample), averaged over the M targets with ``weights`` (default: equal).

    ``negatives`` [N, D] (texts or images to stay away from, weights ``negative_weights`` > 0) add a
    smooth hinge on the margin ``cos_n - cos_p`` (``cos_p``: the weighted cosine with the targets):
    ``w_n * softplus(s * (cos_n - cos_p)) / s`` with CLIP's ``logit_scale`` s, i.e. CLIP's own pairwise
    zero-shot classifier "the prompt, not the negative". It pushes only while a negative is about as
    close as the prompt and fades once the prompt wins by a few 1/s; a plain distance with a negative
    weight (Disco's form) pushes hardest when already far and drags images anywhere away from it.
    """
    scorer: object
    targets: torch.Tensor
    weights: torch.Tensor | None = None
    loss: str = "spherical"
    negatives: torch.Tensor | None = None
    negative_weights: torch.Tensor | None = None
    logit_scale: float = 100.0
    negative_mode: str = "hinge"                # hinge (above) | cosine: w_n * cos_n | spherical: -w_n * distance
    image_pixels: torch.Tensor | None = None    # [K, 3, H, W] in [0, 1]: the image prompts behind the last
                                                # K targets, for :meth:`at` (noise-matched targets)
    negative_pixels: torch.Tensor | None = None  # the same for the last K negatives (negative image prompts)
    noise_draws: int = 4

    def __post_init__(self):
        self.loss_fn = get_loss(self.loss)
        self.targets = F.normalize(self.targets.float(), dim=-1)
        if self.weights is None:
            self.weights = torch.full((self.targets.shape[-2],), 1.0 / self.targets.shape[-2])
        self.weights = torch.as_tensor(self.weights, dtype=torch.float32)
        if self.negatives is not None:
            self.negatives = F.normalize(self.negatives.float(), dim=-1)
            n = self.negatives.shape[0]
            w = torch.ones(n) if self.negative_weights is None else torch.as_tensor(self.negative_weights).float()
            if w.shape != (n,) or not (torch.isfinite(w).all() and (w > 0).all()):
                raise InputError(f"need {n} finite negative weights > 0, got {w.tolist()!r}")
            self.negative_weights = w
        if self.negative_mode not in ("hinge", "cosine", "spherical"):
            raise InputError(f"negative_mode must be hinge, cosine or spherical, got {self.negative_mode!r}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise InputError(f"logit_scale must be a finite number > 0, got {self.logit_scale!r}")
        self._at: dict = {}

    def at(self, abar: float) -> "ClipTarget":
        """This target for a CLIP that sees the noisy sample x_t at noise level ``abar`` (the noise-aware
        ``xt`` guidance method): each image prompt (a target or a negative) becomes the mean embedding
        of itself noised the same way, ``sqrt(abar) (2x - 1) + sqrt(1 - abar) eps`` over
        ``noise_draws`` fixed draws, so it is compared with x_t like for like (a noise-aware CLIP maps
        x_t of a scene near its caption, not near the clean render's embedding). Texts do not change."""
        if (self.image_pixels is None and self.negative_pixels is None) or abar >= 1:
            return self
        key = round(float(abar), 6)
        if key not in self._at:
            targets, negatives = self.targets.cpu(), self.negatives
            if self.image_pixels is not None:
                targets = self._swap_last(targets, self._noised(self.image_pixels, key))
            if self.negative_pixels is not None:
                negatives = self._swap_last(negatives.cpu(), self._noised(self.negative_pixels, key))
            self._at[key] = ClipTarget(self.scorer, targets, self.weights, self.loss, negatives,
                                       self.negative_weights, self.logit_scale, self.negative_mode)
        return self._at[key]

    def _noised(self, pixels: torch.Tensor, abar: float) -> torch.Tensor:
        """The mean embedding [K, D] of ``pixels`` [K, 3, H, W] noised to ``abar`` (fixed draws)."""
        x = pixels.float() * 2 - 1
        eps = torch.randn((self.noise_draws, *x.shape), generator=torch.Generator().manual_seed(0))
        xt = math.sqrt(abar) * x + math.sqrt(1 - abar) * eps
        with torch.no_grad():
            emb = self.scorer.embed_pixels(((xt + 1) / 2).flatten(0, 1).to(self.scorer.device)).float().cpu()
        return F.normalize(emb.view(self.noise_draws, x.shape[0], -1).mean(0), dim=-1)

    @staticmethod
    def _swap_last(rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        k = last.shape[0]
        return torch.cat([rows[:-k], last]) if rows.shape[0] > k else last

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.scorer.embed_pixels(pixels)

    def _rows(self, n: int, device) -> torch.Tensor:
        """Targets [n|1, M, D] for n rows; per-sample targets [B, M, D] are tiled when n = k * B
        (views come view-major: row r belongs to sample r % B)."""
        tgt = self.targets.to(device)
        if tgt.ndim == 2:
            return tgt[None]
        if tgt.shape[0] in (1, n):
            return tgt
        if n % tgt.shape[0]:
            raise InputError(f"{n} rows for {tgt.shape[0]} per-sample targets")
        return tgt.repeat(n // tgt.shape[0], 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.embed(pixels).float()                                         # [B, D]
        dist = self.loss_fn(emb[:, None, :], self._rows(emb.shape[0], emb.device))   # [B, M]
        loss = (dist * self.weights.to(emb.device)).sum(-1)
        if self.negatives is None:
            return loss
        e = F.normalize(emb, dim=-1)
        neg, w = self.negatives.to(e.device), self.negative_weights.to(e.device)
        if self.negative_mode == "spherical":                                      # Disco's form
            return loss - (self.loss_fn(emb[:, None, :], neg[None]) * w).sum(-1)
        if self.negative_mode == "cosine":
            return loss + ((e @ neg.T) * w).sum(-1)
        return loss + self.hinge(e @ neg.T, self._weighted_cos(e))

    def cosine(self, pixels: torch.Tensor) -> torch.Tensor:
        """The weighted mean cosine [B] with the targets (what a user reads as "the CLIP score")."""
        emb = F.normalize(self.embed(pixels).float(), dim=-1)
        return self._weighted_cos(emb)

    def score_images(self, images) -> torch.Tensor:
        """The weighted cosine [N] of images as files are read (paths or PIL images, the scorer's
        exact preprocessing path and core's exact cosines: what ``rerank`` and best-of rank by),
        less each negative's term as guidance counts it (the hinge; ``w * cos_n`` for the linear
        modes). Needs shared targets [M, D]."""
        if self.targets.ndim != 2:
            raise InputError("score_images needs targets shared by every image ([M, D])")
        emb = self.scorer.encode_images(images)
        score = (cosines(emb, self.targets.float()) * self.weights.cpu()).sum(-1)     # [N] fp32, CPU
        if self.negatives is None:
            return score
        cos_n = cosines(emb, self.negatives)                                           # [N, K]
        if self.negative_mode != "hinge":                                              # the linear forms
            return score - (cos_n * self.negative_weights).sum(-1)
        return score - self.hinge(cos_n, score)          # the guidance loss's hinge, so both rank alike

    def hinge(self, cos_n: torch.Tensor, cos_p: torch.Tensor) -> torch.Tensor:
        """The negatives' term [B] from their cosines [B, N] and the prompt's [B]:
        ``sum_n w_n * softplus(s * (cos_n - cos_p)) / s``."""
        s = self.logit_scale
        w = self.negative_weights.to(cos_n.device)
        return (F.softplus(s * (cos_n - cos_p[:, None])) / s * w).sum(-1)

    def _weighted_cos(self, emb: torch.Tensor) -> torch.Tensor:
        tgt = self._rows(emb.shape[0], emb.device)
        return ((emb[:, None, :] * tgt).sum(-1) * self.weights.to(emb.device)).sum(-1)


def clip_text(scorer, texts: Sequence[str], weights: Sequence[float] | None = None,
              loss: str = "spherical") -> ClipTarget:
    """The CLIP text objective: distance to each text's embedding (spherical, as Crowson's notebooks)."""
    if not texts:
        raise InputError("clip_text needs at least one text")
    return ClipTarget(scorer, scorer.text_embeddings(list(texts)), _weights(weights, len(texts)), loss)


def clip_image(scorer, images, weights: Sequence[float] | None = None, loss: str = "spherical") -> ClipTarget:
    """The CLIP image-prompt objective: distance to the embeddings of user images (paths, PIL
    images or a [N, 3, H, W] tensor), each preprocessed as the scorer's own image path does."""
    emb = scorer.encode_images(images)
    return ClipTarget(scorer, emb, _weights(weights, emb.shape[0]), loss)


def _weights(weights, n: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != (n,) or not torch.isfinite(w).all():
        raise InputError(f"need {n} finite weights, got {list(weights)!r}")
    return w


# ---------------------------------------------------------------- composition

@dataclass
class Weighted:
    """``sum_i w_i * objective_i(pixels)``; a negative weight pushes away from that objective."""
    terms: list[tuple[float, Callable]] = field(default_factory=list)

    def __post_init__(self):
        for w, _ in self.terms:
            if not math.isfinite(w):
                raise InputError(f"objective weights must be finite, got {w!r}")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.terms:
            return pixels.new_zeros(pixels.shape[0])
        return sum(w * obj(pixels) for w, obj in self.terms)

    def at(self, abar: float) -> "Weighted":
        """The terms at noise level ``abar`` (those with an ``at``; see :meth:`ClipTarget.at`)."""
        return Weighted([(w, o.at(abar) if hasattr(o, "at") else o) for w, o in self.terms])

    @property
    def views_own_input(self) -> bool:
        """Does a term change its input before the views (:func:`viewed`)?"""
        return any(getattr(o, "views_own_input", False) for _, o in self.terms)

    def viewed(self, make_views: Callable, chunk: int = 8) -> Callable:
        """The sum's mean over views term by term (:func:`viewed` calls this only when a term changes its
        input before the views; otherwise one :class:`Views` of the whole sum: every term the same views)."""
        return Weighted([(w, viewed(o, make_views, chunk)) for w, o in self.terms])

    def score_images(self, images) -> torch.Tensor:
        """The weighted sum of the terms' ``score_images`` [N] (terms without one are skipped)."""
        scored = [(w, o) for w, o in self.terms if hasattr(o, "score_images")]
        if not scored:
            raise InputError("none of these objectives scores images")
        return sum(w * o.score_images(images) for w, o in scored)


@dataclass
class Erased:
    """``objective`` of the pixels with ``boxes`` erased to the background ``fill`` (a level in [0, 1]):
    one object of a layout judged on its own (:func:`clipkit.core.layout.split_layout`), the other
    objects' cells blanked, so a one-object objective (and its count guard, "{prompt} and another
    shape") sees a one-object image.

    ``boxes`` are (x0, y0, x1, y1) fractions of the image; every pixel a box touches is erased, widened
    by ``margin`` pixels. At noise level ``abar`` (:meth:`at`, a CLIP that sees x_t) the erased pixels
    are the background noised as x_t is, ``sqrt(abar) (2 fill - 1) + sqrt(1 - abar) z`` with a fixed
    draw z, so the CLIP sees a noisy one-object image, as it was trained on. Under views
    (:func:`viewed`) the pixels are erased first and the views made of the result, so a view's jitter
    moves the image and its erased cells together.
    """
    objective: Callable
    boxes: Sequence[tuple[float, float, float, float]]
    fill: float = 0.0
    margin: int = 0
    abar: float | None = None       # None: clean pixels (the x0 estimate, files)
    _masks: dict = field(default_factory=dict, repr=False, compare=False)   # (shape, device, dtype) -> (mask, bg)
    _at: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    views_own_input = True          # erased before the views are made (:func:`viewed`)

    def rects(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """The erased pixels of an h x w image: (top, bottom, left, right) rows and columns, end-exclusive."""
        m = self.margin
        return [(max(0, math.floor(y0 * h) - m), min(h, math.ceil(y1 * h) + m),
                 max(0, math.floor(x0 * w) - m), min(w, math.ceil(x1 * w) + m)) for x0, y0, x1, y1 in self.boxes]

    def _mask_and_background(self, shape, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(shape[1:]), str(device), dtype)
        if key not in self._masks:
            h, w = shape[-2:]
            m = torch.ones(1, 1, h, w)
            for top, bottom, left, right in self.rects(h, w):
                m[..., top:bottom, left:right] = 0
            bg = torch.full((1, *shape[1:]), float(self.fill))
            if self.abar is not None:
                z = torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(0))
                bg = (math.sqrt(self.abar) * (2 * bg - 1) + math.sqrt(1 - self.abar) * z + 1) / 2
            self._masks[key] = (m.to(device, dtype), bg.to(device, dtype))
        return self._masks[key]

    def erase(self, pixels: torch.Tensor) -> torch.Tensor:
        m, bg = self._mask_and_background(pixels.shape, pixels.device, pixels.dtype)
        return pixels * m + bg * (1 - m)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.objective(self.erase(pixels))

    def at(self, abar: float) -> "Erased":
        key = round(float(abar), 6)
        key = None if key >= 1 else key
        if key not in self._at:
            inner = self.objective.at(abar) if hasattr(self.objective, "at") else self.objective
            self._at[key] = Erased(inner, self.boxes, self.fill, self.margin, key)
        return self._at[key]

    def viewed(self, make_views: Callable, chunk: int = 8) -> "Erased":
        """Erase, then the objective's mean over views of the erased pixels (:func:`viewed`)."""
        return Erased(viewed(self.objective, make_views, chunk), self.boxes, self.fill, self.margin, self.abar,
                      self._masks)

    def score_images(self, images) -> torch.Tensor:
        """The objective's ``score_images`` of the images (PIL, or paths) with the boxes erased."""
        level = round(255 * self.fill)
        out = []
        for im in images:
            im = load_image(im).copy()
            draw = ImageDraw.Draw(im)
            for top, bottom, left, right in self.rects(im.height, im.width):
                if bottom > top and right > left:
                    draw.rectangle([left, top, right - 1, bottom - 1], fill=(level,) * 3)
            out.append(im)
        return self.objective.score_images(out)


def viewed(objective: Callable, make_views: Callable[[torch.Tensor], torch.Tensor], chunk: int = 8) -> Callable:
    """``objective`` averaged over ``make_views`` of its input (:class:`Views`). An objective that changes
    its input first (:class:`Erased`) does so before the views are made, and a :class:`Weighted` sum
    holding one is viewed term by term (the mean over views is linear), each term drawing its own views."""
    if getattr(objective, "views_own_input", False):
        return objective.viewed(make_views, chunk)
    return Views(objective, make_views, chunk)


@dataclass
class Views:
    """The mean of ``objective`` over ``make_views(pixels) -> [K*B, 3, H, W]`` (view-major: row r is
    a view of sample r % B, so per-sample objectives tile their targets).

    The K views go through the objective ``chunk`` views (``chunk * B`` rows) at a time; when there
    is more than one chunk and gradients are on, each chunk runs under activation checkpointing, so
    peak memory is that of one chunk whatever K is (one chunk runs plainly: no recomputation).
    """
    objective: Callable
    make_views: Callable[[torch.Tensor], torch.Tensor]
    chunk: int = 8

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        B = pixels.shape[0]
        views = self.make_views(pixels)
        K = views.shape[0] // B
        rows = max(1, self.chunk) * B
        if rows >= views.shape[0]:
            return self.objective(views).view(K, B).mean(dim=0)
        losses = []
        for a in range(0, views.shape[0], rows):
            part = views[a:a + rows]
            if torch.is_grad_enabled() and part.requires_grad:
                losses.append(checkpoint(self.objective, part, use_reentrant=False))
            else:
                losses.append(self.objective(part))
        return torch.cat(losses).view(K, B).mean(dim=0)


# ---------------------------------------------------------------- regularisers (pixels in [0, 1])

def tv(pixels: torch.Tensor) -> torch.Tensor:
    """Total variation [B]: mean squared difference of neighbouring pixels."""
    return ((pixels[..., 1:, :] - pixels[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
            + (pixels[..., :, 1:] - pixels[..., :, :-1]).pow(2).mean(dim=(1, 2, 3)))


def range_excess(pixels: torch.Tensor) -> torch.Tensor:
    """Mean squared distance outside [0, 1] [B] (Disco's range loss)."""
    return (pixels - pixels.clamp(0, 1)).pow(2).mean(dim=(1, 2, 3))


def saturation(pixels: torch.Tensor) -> torch.Tensor:
    """Mean absolute distance outside [0, 1] [B] (Disco's saturation loss)."""
    return (pixels - pixels.clamp(0, 1)).abs().mean(dim=(1, 2, 3))


# ---------------------------------------------------------------- aesthetic / preference heads

class AestheticHead(torch.nn.Module):
    """A head on L2-normalised CLIP image embeddings, in the LAION layouts:

    * linear (LAION-AI/aesthetic-predictor): ``weight`` [1, D], ``bias`` [1];
    * MLP (christophschuhmann/improved-aesthetic-predictor): ``layers.{0,2,4,6,7}.{weight,bias}``,
      Linear(D,1024) -> Dropout -> Linear(1024,128) -> Dropout -> Linear(128,64) -> Dropout ->
      Linear(64,16) -> Linear(16,1), no activations (as published).
    """

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        if set(state) == {"weight", "bias"}:
            w = state["weight"]
            self.layers = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0]))
            self.layers[0].load_state_dict(state)
            self.kind = "linear"
        else:
            want = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
            if set(state) != want:
                raise ValueError("not a LAION aesthetic head: expected weight/bias (linear) or "
                                 "layers.{0,2,4,6,7}.weight/bias (MLP), got " + ", ".join(sorted(state)[:6]))
            dims = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
            mods: list[torch.nn.Module] = []
            drops = {0: 0.2, 2: 0.2, 4: 0.1}
            for j, i in enumerate((0, 2, 4, 6, 7)):
                mods.append(torch.nn.Linear(dims[j], dims[j + 1]))
                if i in drops:
                    mods.append(torch.nn.Dropout(drops[i]))
            self.layers = torch.nn.Sequential(*mods)
            self.layers.load_state_dict({k[len("layers."):]: v for k, v in state.items()})
            self.kind = "mlp"
        self.dim = self.layers[0].in_features
        self.eval().requires_grad_(False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(emb.float(), dim=-1)).squeeze(-1)


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """A ``.safetensors`` file or a PyTorch state dict (``.pth``/``.pt``, loaded with
    ``weights_only=True``: pickled code is refused, never run)."""
    p = Path(path).expanduser()
    try:
        if p.suffix == ".safetensors":
            open_regular(p).close()
            state = load_file(str(p))
        else:
            with open_regular(p) as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("not a state dict of tensors")
        return AestheticHead(state)
    except Exception as e:                                          # one line, naming the file
        msg = getattr(e, "reason", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"aesthetic:{path}", msg, "point --scorer at a LAION aesthetic-predictor "
                             "state dict (.pth or .safetensors)") from None


def load_aesthetic(spec: str) -> AestheticHead:
    """An ``aesthetic:PATH`` spec (the registry's scorer kind) -> its head."""
    return load_aesthetic_head(resolve(spec, "scorer").location)


@dataclass
class AestheticScore:
    """Objective: minus the head's score of the CLIP image embedding (higher score, lower loss)."""
    scorer: object
    head: AestheticHead

    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._head(self.scorer.embed_pixels(pixels))

    def _head(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.shape[-1] != self.head.dim:
            raise InputError(f"the aesthetic head takes {self.head.dim}-d CLIP embeddings; "
                             f"this CLIP gives {emb.shape[-1]}-d")
        return self.head.to(emb.device)(emb)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return -self.score(pixels)

    def score_images(self, images) -> torch.Tensor:
        """The head's score [N] of images as files are read (the scorer's own preprocessing path),
        so best-of ranks by it too."""
        with torch.no_grad():
            return self._head(self.scorer.encode_images(images)).float().cpu()


# ---------------------------------------------------------------- ranking with an objective

@torch.no_grad()
def evaluate(objective: Callable, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The objective's loss [N] for candidates [N, 3, H, W], without gradients, in batches."""
    return torch.cat([objective(pixels[a:a + batch_size]).float().cpu()
                      for a in range(0, pixels.shape[0], batch_size)])
