"""Text -> image: a diffusion model steered by CLIP guidance, reranked by CLIP (``clipkit generate``).

:func:`generate` does, for each prompt:

1. draw ``n * best_of`` candidates with seeds ``seed, seed + 1, ...``; every candidate is sampled on
   its own, so its seed alone fixes it (``-n 1 --best-of 1 --seed S`` regenerates the file ``<slug>-S.png``,
   bit for bit on the same machine, torch build and thread count);
2. score each candidate *as saved* (8-bit RGB) by cosine with the prompt under the guiding CLIP,
   ranked with core's ranking (:func:`clipkit.core.ranking.order`: score descending, rounded to
   1e-6, ties by seed), or by a :class:`Selector`'s scores when one is given (e.g. the captioning
   plugin's ``CaptionEndSelector``, passed in by the CLI: plugins never import each other);
3. keep the ``n`` best; optionally write ``DIR/<slug>-<seed>.png`` and a ``.json`` sidecar.

With CLIP guidance off (``clip_scale=0``) candidate seed S is, pixel for pixel, what diffusers' own
pipeline gives for ``generator=torch.Generator().manual_seed(S)`` and a batch of one, with the same
scheduler, steps and (latent) guidance scale: ``DDIMPipeline`` (eta 0), ``DDPMPipeline``,
``PNDMPipeline``, ``StableDiffusionPipeline`` (tests/conformance/test_generation.py). One exception:
a ``cfg_scale`` below 1, where diffusers switches classifier-free guidance off and clipkit keeps
``u + s (c - u)`` (``cfg_scale=0``: the unconditional model).

Diffusion models plug in through :func:`load_diffusion`: it reads the ``_class_name`` of a diffusers
``model_index.json`` and calls the loader registered for it in :data:`LOADERS`. A loader returns an
object with the :class:`DiffusionBackend` protocol; this module implements the pixel one
(``DDPMPipeline``/``DDIMPipeline`` directories and repos, e.g. the bundled Shapes model or
``google/ddpm-cifar10-32``); the latent one (``StableDiffusionPipeline``: classifier-free + CLIP
guidance) is :class:`clipkit.guidance.latent.LatentDiffusion`.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import secrets
import time
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Collection, Iterator, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.core.ranking import order
from clipkit.core.registry import BUNDLED, known_words
from clipkit.guidance.schedulers import OUTPUT_ONLY, SCHEDULERS, count_timesteps, make_scheduler
from clipkit.core.objectives import (AestheticScore, ClipTarget, PromptPart, Weighted, negative_parts, parse_negative,
                                     parse_weighted_path, parse_weighted_prompt)
from clipkit.guidance.wrapper import GuidanceConfig, parse_cut_schedule

log = logging.getLogger(__name__)

#: model_index.json ``_class_name`` -> "module:function" returning a DiffusionBackend.
#: Signature: ``fn(source: str, spec: str, local_only: bool, device, dtype) -> DiffusionBackend``,
#: where ``source`` is a local directory or a hub repo id.
LOADERS: dict[str, str] = {
    "DDPMPipeline": "clipkit.guidance.pipeline:load_pixel",
    "DDIMPipeline": "clipkit.guidance.pipeline:load_pixel",
    "StableDiffusionPipeline": "clipkit.guidance.latent:load_latent",   # latent: CFG + CLIP guidance
}

MAX_SEED = 2 ** 32        # seeds are in [0, 2^32); view noise uses seed + 2^32, so streams never collide
SCORE_NOTE = ("cosine similarity between the image as saved and its prompt, under the guiding CLIP; "
              "guidance optimises this number, so it overstates quality: judge with another CLIP or the oracle")
WEIGHTED_NOTE = ("weighted cosine similarity between the image as saved and the prompt's positive parts and image "
                 "prompts, under the guiding CLIP(s) (an ensemble: weighted by --clip-weights), plus each "
                 "--scorer's score times its weight, less each "
                 "negative's hinge w * softplus(s (cos_neg - cos)) / s (w: its strength, s: CLIP's logit "
                 "scale); with layout grid, the mean of that over the prompt's objects, each scored on the "
                 "image with the other objects' grid cells erased; guidance optimises this number, so it "
                 "overstates quality: judge with another CLIP or the oracle")
SCORE_NOTES = {"cosine": SCORE_NOTE, "weighted": WEIGHTED_NOTE}     # by score_kind


def score_kind(config: "GenerateConfig", prompt: str, n_clips: int) -> str:
    """"cosine" when a prompt's score is its plain cosine under one CLIP, else "weighted" (weights,
    negatives, image prompts, scorers, a layout or an ensemble)."""
    parts = prompt_parts(prompt, config)
    plain = len(parts) == 1 and parts[0].weight > 0 and not (config.image_prompts or config.scorers) and n_clips == 1
    return "cosine" if plain and not prompt_layout(prompt, config) else "weighted"


#: per guide target, what GenerateConfig's None fields mean (chosen on the development prompts of
#: bench/guidance.py, BENCHMARKS.md): guiding the x0 estimate, stop at t/T = 0.3 and let the model clean
#: up; guiding x_t with a noise-aware CLIP, guide to the end with steps in proportion to the noise left
TARGET_DEFAULTS = {"x0": {"guide_stop": 0.3, "step_schedule": "constant"},
                   "xt": {"guide_stop": 0.0, "step_schedule": "sigma"}}


#: GenerateConfig.layout values
LAYOUTS = ("off", "grid")


@dataclass
class GenerateConfig:
    """Sampling and guidance parameters (saved in every sidecar)."""
    steps: int = 25                 # denoising steps
    scheduler: str = "ddim"         # one of SCHEDULERS
    clip_scale: float = 0.2         # CLIP guidance strength, 0 = off. step_mode "normalized": the RMS (x0 units,
                                    # pixels in [-1, 1]) each guided step moves the x0 estimate along -grad;
                                    # "scaled": the multiplier of the CLIP loss (classifier guidance, ~100-1000)
    step_mode: str = "normalized"   # normalized | scaled
    cfg_scale: float | None = None  # classifier-free guidance: text-conditioned (latent) models only;
                                    # None: the model's default (latent: 7.5, recorded in the sidecar)
    views: int = 4                  # augmented views of x0 per step, CLIP loss averaged over them
    cutouts: int = 0                # random square crops per step, on top of the views
    guide_start: float = 1.0        # guide while t/T is in [guide_stop, guide_start]
    guide_stop: float | None = None # None: the target's default (TARGET_DEFAULTS)
    step_schedule: str | None = None    # "constant" | "sigma" (step * sqrt(1 - abar_t)); None: the target's
    apply: str | None = None        # None: "sample" ("output" for schedulers in OUTPUT_ONLY)
    grad_mode: str = "x0"           # x0 (cheap) | unet (backprop through the denoiser)
    guide_target: str = "auto"      # what the CLIP sees: x0 (the x0 estimate, any CLIP) | xt (the noisy
                                    # input itself: a noise-aware CLIP, `train clip --noise-aware`) |
                                    # auto: xt when a guiding CLIP is noise-aware (in an ensemble: any)
                                    # and the model takes it, else x0
    size: int | None = None         # image side in pixels; None: the model's native size
    best_of: int = 1                # candidates per kept image (kept: the best by CLIP score)
    drafts: int = 1                 # trajectories started per candidate; after draft_steps the best
                                    # (by the same score, on their x0 estimates) go on (1: off)
    draft_steps: int = 13           # steps every draft runs before the choice (chosen on bench/early_selection.py)
    negative: list = field(default_factory=list)        # texts pushed away (a prompt part of weight -1
                                                        # each; latent models: also the CFG negative prompt)
    image_prompts: list = field(default_factory=list)   # [[path, weight], ...]: CLIP image targets
    clip_weights: list | None = None    # one weight per guiding CLIP (an ensemble); None: equal
    scorers: list = field(default_factory=list)         # [[spec, weight], ...]: image scorers on the first
                                                        # CLIP's embeddings (aesthetic:PATH), score maximised
    tv_scale: float = 0.0           # total variation of the x0 estimate (pixels in [0, 1])
    range_scale: float = 0.0        # squared excess of the x0 estimate outside [0, 1]
    sat_scale: float = 0.0          # absolute excess outside [0, 1] (Disco's saturation loss)
    cut_schedule: str | None = None # "VIEWS+CUTOUTS,..." for equal parts of the trajectory (noise -> clean)
    init_image: str | None = None   # start from this image noised to `strength` of the trajectory
    strength: float = 0.5           # with init_image: 0 < S <= 1 (1: from pure noise)
    layout: str = "off"             # "grid": a text prompt "A at P1 and B at P2 ..." whose parts each name
                                    # their own cell of a 3x3 grid (core.layout) guides each part on the image
                                    # with the other parts' cells erased (objectives.Erased); "off": as one text

    def validate(self) -> "GenerateConfig":
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        for name in ("clip_scale", "cfg_scale"):
            v = getattr(self, name)
            if v is None and name == "cfg_scale":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.step_mode not in ("normalized", "scaled"):
            raise InputError(f"step_mode must be 'normalized' or 'scaled', got {self.step_mode!r}")
        for name, lo in (("views", 1), ("cutouts", 0), ("best_of", 1), ("drafts", 1), ("draft_steps", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise InputError(f"{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.size is not None and (not isinstance(self.size, int) or self.size < 8):
            raise InputError(f"size must be an integer >= 8 pixels, got {self.size!r}")
        if self.guide_target not in ("auto", "x0", "xt"):
            raise InputError(f"guide_target must be 'auto', 'x0' or 'xt', got {self.guide_target!r}")
        for name in ("tv_scale", "range_scale", "sat_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if self.layout not in LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        s = self.strength
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not (0 < s <= 1):
            raise InputError(f"strength must be a number in (0, 1], got {s!r}")
        if self.init_image is not None:
            self.init_image = str(self.init_image)
            if self.scheduler == "pndm":      # its warm-up timesteps cannot be entered part-way
                raise InputError("--init-image cannot start part-way through pndm's warm-up steps: use another "
                                 "--scheduler (ddim, the default)")
        if isinstance(self.negative, str):
            self.negative = [self.negative]
        self.negative = list(self.negative)
        for t in self.negative:
            parse_negative(t)                       # non-empty TEXT[:STRENGTH > 0]: an InputError
        self.image_prompts = [list(ip) if not isinstance(ip, str) else list(parse_weighted_path(ip))
                              for ip in self.image_prompts]
        for ip in self.image_prompts:
            if len(ip) != 2 or not isinstance(ip[1], (int, float)) or not math.isfinite(ip[1]):
                raise InputError(f"an image prompt is PATH[:WEIGHT], got {ip!r}")
            ip[0], ip[1] = str(ip[0]), float(ip[1])
        if self.clip_weights is not None:
            w = list(self.clip_weights)
            if not w or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in w):
                raise InputError(f"clip weights must be finite numbers > 0, got {self.clip_weights!r}")
            self.clip_weights = [float(v) for v in w]
        self.scorers = [list(sc) if not isinstance(sc, str) else list(parse_weighted_path(sc)) for sc in self.scorers]
        from clipkit.core.registry import parse_spec
        for sc in self.scorers:
            if len(sc) != 2 or not isinstance(sc[1], (int, float)) or not (math.isfinite(sc[1]) and sc[1] > 0):
                raise InputError(f"a scorer is SPEC[:WEIGHT > 0], got {sc!r}")
            parse_spec(str(sc[0]), "scorer")                      # a one-line error for a bad spec
            sc[0], sc[1] = str(sc[0]), float(sc[1])
        self.guidance().validate()
        return self

    def resolve_target(self, noise_aware: bool, targets: Sequence[str]) -> "GenerateConfig":
        """Settle ``guide_target="auto"`` (xt when the CLIP is noise-aware and the model takes xt) and
        that target's defaults for the fields left None (TARGET_DEFAULTS)."""
        target = self.guide_target
        if target == "auto":
            target = "xt" if noise_aware and "xt" in targets else "x0"
        filled = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in TARGET_DEFAULTS[target].items()}
        return dataclasses.replace(self, guide_target=target, **filled)

    def resolved_apply(self) -> str:
        if self.apply is not None:
            if self.apply == "sample" and self.scheduler in OUTPUT_ONLY:
                raise InputError(f"scheduler {self.scheduler!r} cannot take apply='sample' (it keeps its own "
                                 "sample history); use apply='output' or another scheduler")
            return self.apply
        return "output" if self.scheduler in OUTPUT_ONLY else "sample"

    def guidance(self) -> GuidanceConfig:
        """The wrapper config these parameters mean (an unsettled "auto" target means x0 here:
        :func:`generate` settles it with :meth:`resolve_target`, knowing the CLIP)."""
        if self.guide_target == "auto" or self.guide_stop is None or self.step_schedule is None:
            return self.resolve_target(False, ("x0",)).guidance()
        normalized = self.step_mode == "normalized"
        return GuidanceConfig(scale=1.0 if normalized else float(self.clip_scale),
                              x0_step=float(self.clip_scale) if normalized else None,
                              views=self.views, cutouts=self.cutouts, start=self.guide_start,
                              stop=self.guide_stop, apply=self.resolved_apply(), grad_mode=self.grad_mode,
                              target=self.guide_target, step_schedule=self.step_schedule,
                              tv_scale=float(self.tv_scale), range_scale=float(self.range_scale),
                              sat_scale=float(self.sat_scale),
                              cut_schedule=parse_cut_schedule(self.cut_schedule) if self.cut_schedule else None)

    @property
    def guided(self) -> bool:
        return self.clip_scale > 0

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Diffusion backends
# --------------------------------------------------------------------------------------------

@runtime_checkable
class DiffusionBackend(Protocol):
    """What :func:`generate` needs from a diffusion model."""
    spec: str            # the model spec it was loaded from
    kind: str            # "pixel" | "latent"
    conditional: bool    # takes text itself (then cfg_scale applies)
    native_size: int     # default image side in pixels
    guide_targets: tuple  # what its CLIP guidance can show the CLIP: ("x0", "xt") or ("x0",)

    def check(self, config: GenerateConfig) -> GenerateConfig:
        """Raise InputError for parameters this model cannot take (before anything is generated);
        return the config with this model's defaults filled in (what is used and recorded)."""

    def steps_per_image(self, config: GenerateConfig) -> int:
        """How many times ``generate`` calls ``on_step`` per image (for progress bars)."""

    def trajectory(self, cond: "Conditioning", seed: int, config: GenerateConfig) -> Iterator:
        """One image's sampling, step by step: :class:`~clipkit.guidance.wrapper.SampleState` after every
        step (``x`` and ``x0`` in the model's space); it must depend only on (cond, seed, config)."""

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels [B, 3, H, W] in [0, 1] on the CPU (the final ``x``, or an ``x0``)."""


@dataclass
class Conditioning:
    """What one prompt asks of a backend: the objective guidance optimises and, for text-conditioned
    models, the texts of classifier-free guidance; optionally an image to start from."""
    objective: Callable | None      # pixels in [0, 1] -> loss [B] (None: unguided)
    text: str = ""                  # what a text-conditioned model is conditioned on
    negative: str | None = None     # its CFG negative prompt (None: "")
    init: torch.Tensor | None = None    # [1, 3, H, W] pixels in [0, 1] at the output size (img2img)
    strength: float = 1.0           # with init: the part of the trajectory that is run


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> 8-bit RGB PIL image (rounded, as diffusers does)."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


class PixelDiffusion:
    """An unconditional pixel-space ``UNet2DModel`` + its scheduler config, guided by CLIP."""
    kind = "pixel"
    conditional = False
    guide_targets = ("x0", "xt")

    def __init__(self, unet, scheduler_config: dict, spec: str, device="cpu", dtype=torch.float32):
        unet = unet.to(device) if unet.dtype == dtype else unet.to(device, dtype)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        size = unet.config.sample_size
        self.native_size = int(size if isinstance(size, int) else size[0])
        self.channels = int(unet.config.in_channels)
        self._multiple = 2 ** (len(unet.config.block_out_channels) - 1)

    def _model(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t).sample.float()

    def check(self, config: GenerateConfig) -> GenerateConfig:
        if config.cfg_scale not in (None, 0):
            raise InputError(f"--cfg-scale applies to text-conditioned (latent) models only; {self.spec!r} is an "
                             "unconditional pixel model steered by CLIP guidance alone: drop --cfg-scale "
                             "(use --clip-scale)")
        size = config.size or self.native_size
        if size % self._multiple:
            raise InputError(f"size must be a multiple of {self._multiple} for {self.spec!r}, got {size}")
        if self.channels != 3:
            raise InputError(f"{self.spec!r} has {self.channels} channels; CLIP guidance needs RGB (3)")
        self.steps_per_image(config)
        return config

    def steps_per_image(self, config: GenerateConfig) -> int:
        return count_timesteps(config.scheduler, self.scheduler_config, config.steps, self.spec)

    def trajectory(self, cond: Conditioning, seed: int, config: GenerateConfig):
        """One image's sampling as :func:`~clipkit.guidance.wrapper.iter_sample` states (model space)."""
        from clipkit.guidance.wrapper import GuidedDenoiser, iter_sample
        size = config.size or self.native_size
        init = None if cond.init is None else (cond.init.to(self.device) * 2 - 1)  # model space
        sched = make_scheduler(config.scheduler, self.scheduler_config)
        noise = torch.Generator().manual_seed(int(seed))                      # CPU: same noise on any device
        model, hook = self._model, None
        if config.guided and cond.objective is not None:
            model = GuidedDenoiser(self._model, sched, cond.objective, config.guidance(),
                                   generator=torch.Generator().manual_seed(int(seed) + MAX_SEED))
            hook = model.after_step
        return iter_sample(model, sched, (1, self.channels, size, size), config.steps, noise, device=self.device,
                           after_step=hook, init=init, strength=cond.strength)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space [-1, 1] -> pixels [B, 3, H, W] in [0, 1], on the CPU."""
        return ((x.detach().float() + 1) / 2).clamp(0, 1).cpu()


def load_pixel(source: str, spec: str, local_only: bool, device="cpu", dtype=torch.float32) -> PixelDiffusion:
    """A diffusers DDPM/DDIM pipeline (``unet/`` + ``scheduler/``) from a directory or a hub repo."""
    from diffusers import DDPMScheduler, UNet2DModel
    where = {"pretrained_model_name_or_path": str(Path(source) / "unet")} if Path(source).is_dir() else \
        {"pretrained_model_name_or_path": source, "subfolder": "unet", "local_files_only": local_only}
    unet = UNet2DModel.from_pretrained(**where, dtype=torch.float32)
    where = {"pretrained_model_name_or_path": str(Path(source) / "scheduler")} if Path(source).is_dir() else \
        {"pretrained_model_name_or_path": source, "subfolder": "scheduler", "local_files_only": local_only}
    sched_cfg = DDPMScheduler.load_config(**where)
    return PixelDiffusion(unet, sched_cfg, spec, device=device, dtype=dtype)


def _resolve_loader(class_name: str, spec: str) -> Callable:
    if class_name not in LOADERS:
        raise ModelLoadError(spec, f"unsupported diffusion pipeline {class_name!r}",
                             f"supported: {', '.join(sorted(LOADERS))}")
    module, _, attr = LOADERS[class_name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(spec, f"{class_name} support is not available in this installation ({e})",
                             "use a DDPM pixel model such as 'shapes'") from None


def load_diffusion(spec: str = "shapes", device="cpu", precision: str = "fp32") -> DiffusionBackend:
    """Resolve a diffusion model spec -> a :class:`DiffusionBackend`.

    ``shapes`` (bundled), a local diffusers pipeline directory (``model_index.json``) or ``hf:ORG/NAME``.
    Failures raise :class:`ModelLoadError` naming the spec and the fix; hub loads fail fast offline.
    """
    from clipkit.core import hub
    from clipkit.core.registry import parse_spec
    from clipkit.core.scorer import resolve_device, resolve_dtype
    s = parse_spec(spec, "diffusion")
    device, dtype = resolve_device(device), resolve_dtype(precision)
    r = s.resolve()             # a directory or a hub repo id; hub checks done (fails fast offline)
    try:
        class_name = json.loads(r.file("model_index.json").read_text()).get("_class_name", "?")
    except Exception as e:
        raise ModelLoadError(r.raw, hub.one_line(e), r.fix("check the directory")) from e
    loader = _resolve_loader(class_name, r.raw)
    try:
        return loader(r.location, r.raw, r.local_only, device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(r.raw, hub.one_line(e), r.fix("check the pipeline's unet/ and scheduler/ folders")) from e


# --------------------------------------------------------------------------------------------
# Results, file names, sidecars
# --------------------------------------------------------------------------------------------

@dataclass
class GeneratedImage:
    prompt: str
    seed: int
    image: Image.Image
    clip_score: float               # the score best-of ranks by (``score``): cosine(image as saved, prompt)
                                    # under the guiding CLIP, or the weighted score of WEIGHTED_NOTE
    rank: int                       # 1 = best of this prompt's candidates
    path: str | None = None         # the PNG, when written
    sidecar: str | None = None      # its JSON sidecar
    selection_score: float | None = None    # the Selector's score, when one chose among candidates
    score: str = "cosine"           # what clip_score is: "cosine" | "weighted" (:func:`score_kind`)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k != "image" and not (k == "selection_score" and v is None)}


@dataclass
class GenerateResult:
    images: list[GeneratedImage]    # per prompt (in the order given), best first
    config: GenerateConfig
    models: dict                    # {"clip": spec, "diffusion": spec, "diffusion_kind": ...}
    n: int
    seed: int                       # first seed; candidate k of every prompt has seed + k
    candidates: int                 # candidates per prompt (n * best_of)
    wall_s: float = 0.0
    out_dir: str | None = None

    @property
    def score(self) -> str:
        """"cosine" when every image's score is its prompt's plain cosine, else "weighted" (each image
        says which it is)."""
        return "weighted" if any(im.score == "weighted" for im in self.images) else "cosine"

    @property
    def score_note(self) -> str:
        return SCORE_NOTES[self.score]

    def score_label(self) -> str:
        """What the score column means, in words."""
        clips = self.models["clip"] if isinstance(self.models["clip"], list) else [self.models["clip"]]
        under = f"CLIP {clips[0]!r}" if len(clips) == 1 else "CLIPs " + ", ".join(map(repr, clips)) + " (weighted)"
        parts = [prompt_parts(im.prompt, self.config) for im in self.images]
        weighted = self.config.image_prompts or any(len([p for p in ps if p.weight > 0]) > 1 for ps in parts)
        label = ("weighted cosine with the prompt's parts and image prompts" if weighted else "cosine with the prompt")
        if any(prompt_layout(im.prompt, self.config) for im in self.images):
            label = ("mean over the prompt's objects of the cosine with each object's text, the other objects' "
                     "grid cells erased (--layout grid)")
        if self.config.scorers:
            label += ", plus " + " + ".join(f"{w:g} x {spec}" for spec, w in self.config.scorers)
        if any(p.weight < 0 for ps in parts for p in ps):
            label += ", less the negatives' hinge" + (f" ({'; '.join(self.config.negative)})"
                                                      if self.config.negative else "") + ","
        return f"{label} under {under}"

    def to_dict(self) -> dict:
        return {"score": self.score, "score_note": self.score_note, "models": self.models,
                "parameters": parameters(self.config, self.n, self.seed), "candidates": self.candidates,
                "out_dir": self.out_dir, "wall_s": round(self.wall_s, 3),
                "images": [im.to_dict() for im in self.images]}


def parameters(config: GenerateConfig, n: int, seed: int) -> dict:
    """What a sidecar records of a run (``strength`` only with an init image: it means nothing without)."""
    d = {"n": n, "seed": seed, **config.to_dict(), "guidance": config.guidance().to_dict()}
    if config.init_image is None:
        d.pop("strength")
    return d


def slugify(prompt: str, max_len: int = 60) -> str:
    """File-name stem of a prompt: lowercase ASCII words joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "prompt"


def plan_targets(prompts: Sequence[str], seeds: Sequence[int], out_dir: Path) -> dict[tuple[int, int], Path]:
    """(prompt index, seed) -> PNG path, for every candidate that could be kept."""
    owner: dict[str, str] = {}
    for p in prompts:
        slug = slugify(p)
        if slug in owner:
            raise InputError(f"prompts {owner[slug]!r} and {p!r} give the same file name stem {slug!r}: "
                             "generate them in separate runs (with other seeds or --out)")
        owner[slug] = p
    return {(i, s): out_dir / f"{slugify(p)}-{s}.png" for i, p in enumerate(prompts) for s in seeds}


def check_out_dir(out_dir: Path, targets: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work if the outputs cannot be written or would replace files (without overwrite)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"output directory {out_dir} exists and is not a directory")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise InputError(f"output directory {out_dir} is not writable")
        if not overwrite:
            # lexists: a dangling symlink counts as taken (it is never written through either)
            taken = [p for t in targets for p in (t, t.with_suffix(".json")) if os.path.lexists(p)]
            if taken:
                more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
                raise InputError(f"refusing to overwrite {taken[0]}{more}: pass --overwrite, or choose "
                                 "another --seed or --out")
        return
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create output directory {out_dir}: {parent} is not a writable directory")


def make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None


def _write_bytes(path: Path, data: bytes, overwrite: bool) -> None:
    """Atomic, never through a symlink (a planted link is replaced, not followed), never a file that
    appeared meanwhile without ``overwrite``."""
    from clipkit.core.outputs import write_bytes_atomic
    try:
        write_bytes_atomic(path, data, overwrite=overwrite)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def write_image(img: GeneratedImage, png: Path, sidecar: dict, overwrite: bool) -> None:
    """PNG (with the sidecar in a ``clipkit`` text chunk) + ``.json`` beside it."""
    import io

    from PIL.PngImagePlugin import PngInfo
    doc = json.dumps(sidecar, indent=2, ensure_ascii=False)
    info = PngInfo()
    info.add_itxt("clipkit", doc)
    buf = io.BytesIO()
    img.image.save(buf, format="PNG", pnginfo=info)
    _write_bytes(png, buf.getvalue(), overwrite)
    _write_bytes(png.with_suffix(".json"), (doc + "\n").encode("utf-8"), overwrite)
    img.path, img.sidecar = str(png), str(png.with_suffix(".json"))


def unknown_words(prompt: str, vocab: Collection[str] | None = None) -> list[str]:
    """Words of ``prompt`` not in ``vocab`` (in order, without repeats); ``vocab`` defaults to the
    words the bundled Shapes models know (no Shapes caption uses the others)."""
    if vocab is None:
        vocab = known_words(BUNDLED) or set()
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in vocab))


def _spec_of(model) -> str:
    return model if isinstance(model, str) else getattr(model, "spec", type(model).__name__)


def warn_unknown_words(prompts: Sequence[str], vocab: Collection[str] | None = None) -> None:
    for p in prompts:
        unknown = unknown_words(p, vocab)
        if unknown:
            log.warning("%r: the bundled Shapes models do not know %s (they know only shapes, colours, sizes and "
                        "positions); for real prompts use --profile sd, or --diffusion SPEC and --clip SPEC",
                        p, ", ".join(repr(w) for w in unknown))


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def _check_prompts(prompts, allow_empty: bool = False) -> list[str]:
    """Strings, stripped; ``allow_empty``: an empty prompt is allowed (a run guided by image prompts)."""
    from clipkit.core.backends import check_texts
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
    """(the placed objects a grid layout guides one by one, None) or (None, why it guides as one text)."""
    from clipkit.core.layout import split_layout
    if config.image_prompts or config.scorers:
        return None, "image prompts and scorers judge the whole image"
    if has_cutouts(config):
        return None, "a crop (cutouts) does not show the grid's cells where they are"
    parts = parse_weighted_prompt(prompt)
    if len(parts) != 1 or parts[0].weight <= 0:
        return None, "a prompt of weighted parts guides as written"
    placed = split_layout(parts[0].text)
    if placed is None:
        return None, ("it is not two or more objects joined by 'and', each naming its own cell of the 3x3 grid "
                      "(e.g. 'a red circle at the top left and a blue square on the right')")
    return placed, None


def why_no_layout(prompt: str, config: GenerateConfig) -> str | None:
    """Why ``layout="grid"`` would guide ``prompt`` as one text rather than object by object (None: it
    would not)."""
    return _layout(prompt, config)[1]


def prompt_layout(prompt: str, config: GenerateConfig) -> list | None:
    """The placed objects (:func:`clipkit.core.layout.split_layout`) that ``config.layout="grid"`` guides one
    by one, or None: layout off, or a prompt it does not apply to (:func:`why_no_layout`)."""
    return _layout(prompt, config)[0] if config.layout == "grid" else None


def check_parts(prompt: str, config: GenerateConfig) -> list[PromptPart]:
    """The parts of one prompt, or an InputError when nothing in it pulls (no positive weight)."""
    parts = prompt_parts(prompt, config)
    if not any(p.weight > 0 for p in parts) and not any(w > 0 for _, w in config.image_prompts):
        raise InputError(f"prompt {prompt!r}: nothing to guide towards: give a text or --image-prompt "
                         "with a positive weight")
    return parts


def read_image(path: str, what: str) -> Image.Image:
    """A user image (an image prompt, an init image), read time-bound: a one-line InputError naming it."""
    from clipkit.core.errors import ImageLoadError
    from clipkit.core.io import load_image
    try:
        return load_image(Path(path).expanduser())
    except ImageLoadError as e:
        raise InputError(f"{what} {path}: {e.reason}") from None


def init_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An init image -> [1, 3, size, size] in [0, 1] (resized with PIL's bicubic filter)."""
    import numpy as np
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
    from clipkit.core.objectives import Erased
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


def steps_for_strength(run: int, strength: float) -> int:
    """The fewest schedule steps of which an img2img run at ``strength`` runs ``run`` (it runs
    ``int(steps * strength)``, as in diffusers)."""
    steps = max(1, int(run / strength))       # at most the answer: (that - 1) x strength < run
    while int(steps * strength) < run:
        steps += 1
    return steps


def make_config(config: GenerateConfig | None, options: dict) -> GenerateConfig:
    names = {f.name for f in fields(GenerateConfig)}
    bad = sorted(set(options) - names)
    if bad:
        raise InputError(f"unknown generate option(s) {', '.join(bad)}: choose from {', '.join(sorted(names))}")
    base = asdict(config) if config is not None else {}
    return GenerateConfig(**{**base, **options}).validate()


class Selector(Protocol):
    """Best-of selection: ``(candidate images, prompt, their CLIP cosines [N]) -> scores [N]``,
    higher is better; ``name`` goes in the sidecars. Plugins or the CLI supply one (e.g. the
    captioning plugin's :class:`~clipkit.captioning.captioner.CaptionEndSelector`)."""
    name: str

    def __call__(self, images: Sequence[Image.Image], prompt: str, clip_scores: torch.Tensor) -> torch.Tensor: ...


def run_candidates(pipe, cond: Conditioning, seeds: Sequence[int], config: GenerateConfig, keep: int,
                   rank: Callable, on_step: Callable[[], None] | None = None) -> tuple[list[int], list[Image.Image]]:
    """Sample ``seeds`` and return ``keep`` of them finished: (their indices in ``seeds``, images).

    Without drafts (``len(seeds) == keep``) every seed is sampled to the end. With drafts, every
    trajectory runs ``config.draft_steps`` steps, ``rank(images) -> scores`` judges their x0 estimates
    (as 8-bit images, like the final ones), and the ``keep`` best (ties by seed) go on to the end; the
    others stop there. A trajectory continued is the one sampled alone, so seed S regenerates its image.
    """
    trajs = [pipe.trajectory(cond, s, config) for s in seeds]
    last: list = [None] * len(seeds)

    def advance(k: int, n: int | None):
        for j, state in enumerate(trajs[k]):
            last[k] = state
            if on_step:
                on_step()
            if n is not None and j + 1 >= n:
                return
    alive = list(range(len(seeds)))
    if keep < len(seeds):
        for k in alive:
            advance(k, config.draft_steps)
        previews = [tensor_to_pil(pipe.to_pixels(last[k].x0 if last[k].x0 is not None else last[k].x)[0])
                    for k in alive]
        scores = torch.as_tensor(rank(previews), dtype=torch.float32)
        alive = sorted(alive[j] for j, _ in order([seeds[k] for k in alive], scores, keep))
    images = []
    for k in alive:
        advance(k, None)
        images.append(tensor_to_pil(pipe.to_pixels(last[k].x)[0]))
    return alive, images


def _step_counter(on_step, total: int):
    """A no-argument callback that reports (steps done, total) to ``on_step``."""
    done = [0]

    def step():
        done[0] += 1
        on_step(done[0], total)
    return step


def generate(prompts: str | Sequence[str], n: int = 1, *, seed: int | None = None,
             config: GenerateConfig | None = None, diffusion="shapes", clip="shapes-noised", device="auto",
             precision: str = "fp32", out_dir=None, overwrite: bool = False,
             on_step: Callable[[int, int], None] | None = None, select: "Selector | None" = None,
             **options) -> GenerateResult:
    """Generate ``n`` images per prompt with CLIP guidance (and best-of-``best_of`` CLIP reranking).

    Args:
        prompts: a prompt or a list of prompts.
        n: images kept per prompt.
        seed: first seed (None: a random one, recorded); candidate k of each prompt uses ``seed + k``.
        config / options: a :class:`GenerateConfig` and/or its fields as keywords
            (``steps=``, ``clip_scale=``, ``best_of=``, ``scheduler=``, ``cutouts=``, ``size=``, ...).
        diffusion: a spec (``shapes``, a diffusers directory, ``hf:ORG/NAME``) or a loaded DiffusionBackend.
        clip: a spec or a loaded :class:`~clipkit.core.scorer.ClipScorer` (guides and scores), or a
            list of them (an ensemble, weighted by ``clip_weights``); the default is the bundled
            noise-aware Shapes CLIP (``shapes-noised``), guiding x_t.
        out_dir: write ``<slug>-<seed>.png`` + ``.json`` sidecars there; existing files are an error
            unless ``overwrite`` (checked before anything is generated).
        on_step: ``on_step(done, total)`` after every denoising step of every candidate (progress bars).
        select: how best-of keeps its ``n`` (a :class:`Selector`: candidates, prompt and their CLIP
            cosines -> selection scores, higher is better); None: the CLIP cosine itself.
    """
    t0 = time.time()
    # 1. validate everything that needs no model
    cfg = make_config(config, options)
    prompts = _check_prompts(prompts, allow_empty=bool(cfg.image_prompts))
    parts = [check_parts(p, cfg) for p in prompts]
    image_prompts = [(read_image(path, "image prompt"), w) for path, w in cfg.image_prompts]
    from clipkit.core.objectives import load_aesthetic
    heads = [(load_aesthetic(spec), w) for spec, w in cfg.scorers]      # small files, read before any model
    init_image = read_image(cfg.init_image, "init image") if cfg.init_image else None
    clips = list(clip) if isinstance(clip, (list, tuple)) else [clip]
    if not clips:
        raise InputError("give at least one CLIP")
    if cfg.clip_weights is not None and len(cfg.clip_weights) != len(clips):
        raise InputError(f"{len(cfg.clip_weights)} clip weights for {len(clips)} CLIPs: give one per --clip")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    n_cand = n * cfg.best_of                       # finished candidates per prompt
    n_seeds = n_cand * cfg.drafts                   # trajectories started per prompt
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - n_seeds)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - n_seeds:
        raise InputError(f"seed must be an integer in [0, {MAX_SEED - n_seeds}], got {seed!r}")
    seeds = list(range(seed, seed + n_seeds))
    vocab = next((v for v in map(known_words, (*map(_spec_of, clips), _spec_of(diffusion))) if v is not None), None)
    if vocab is not None:                         # a bundled model: it knows only its world's words
        # the words the user wrote (a {prompt} negative would repeat the prompt's)
        warn_unknown_words([pt.text for ps in parts for pt in ps if not pt.templated], vocab)
    # 2. outputs: every file that could be written, checked before any work
    targets: dict = {}
    if out_dir is not None:
        out_dir = Path(out_dir).expanduser()
        targets = plan_targets(prompts, seeds, out_dir)
        check_out_dir(out_dir, list(targets.values()), overwrite)
    # 3. models, and what they accept
    from clipkit.core.scorer import load_scorer
    scorers = [load_scorer(c, device=device, precision=precision) if isinstance(c, str) else c for c in clips]
    scorer = scorers[0]
    if heads:
        dim = scorer.text_embeddings(["a"]).shape[-1]
        for (spec, _), (head, _) in zip(cfg.scorers, heads):
            if head.dim != dim:
                raise InputError(f"scorer {spec} takes {head.dim}-d CLIP image embeddings; the first CLIP "
                                 f"({scorer.spec}) gives {dim}-d: give a --clip it was trained on")
    pipe = load_diffusion(diffusion, device=scorer.device, precision=precision) if isinstance(diffusion, str) \
        else diffusion
    from clipkit.core.registry import is_noise_aware
    aware = [is_noise_aware(s.spec) for s in scorers]
    auto = cfg.guide_target == "auto"
    cfg = pipe.check(cfg.resolve_target(any(aware), pipe.guide_targets))   # an ensemble with one: all see x_t
    if auto and cfg.guide_target == "xt" and not all(aware):
        log.info("guide target x_t (a noise-aware CLIP is in the ensemble): %s see x_t too",
                 ", ".join(s.spec for s, a in zip(scorers, aware) if not a))
    models = {"clip": scorer.spec if len(scorers) == 1 else [s.spec for s in scorers],
              "diffusion": pipe.spec, "diffusion_kind": pipe.kind}
    per_image = pipe.steps_per_image(cfg)
    if init_image is not None:                    # img2img runs the last part of the trajectory only
        per_image = max(1, per_image * max(1, min(cfg.steps, int(cfg.steps * cfg.strength))) // cfg.steps)
    drafted = min(cfg.draft_steps, per_image) if cfg.drafts > 1 else 0
    total = n_seeds * drafted + n_cand * (per_image - drafted)
    step = None if on_step is None else _step_counter(on_step, len(prompts) * total)
    init = None if init_image is None else init_pixels(init_image, cfg.size or pipe.native_size)
    # 4. sample, score, keep the best, write
    from clipkit import __version__
    if out_dir is not None:
        make_out_dir(out_dir)
    kept: list[GeneratedImage] = []
    for pi, prompt in enumerate(prompts):
        objective = prompt_objective(prompt, parts[pi], image_prompts, scorers, cfg, cfg.size or pipe.native_size,
                                     heads)
        text, negative = conditioning_text(parts[pi])
        kind = score_kind(cfg, prompt, len(scorers))
        placed = prompt_layout(prompt, cfg)
        cond = Conditioning(objective if cfg.guided else None, text, negative, init,
                            cfg.strength if init is not None else 1.0)
        def rank(images, objective=objective, prompt=prompt):
            scores = objective.score_images(images)
            return scores if select is None else torch.as_tensor(select(images, prompt, scores), dtype=torch.float32)
        kept_idx, images = run_candidates(pipe, cond, seeds, cfg, n_cand, rank, on_step=step)
        finished = [seeds[k] for k in kept_idx]
        scores = objective.score_images(images)                                   # [n_cand]
        chosen = scores if select is None or n_cand == n else \
            torch.as_tensor(select(images, prompt, scores), dtype=torch.float32)
        for k, rank_ in order(finished, chosen, n):                             # the n best, ties by seed
            img = GeneratedImage(prompt, finished[k], images[k], float(scores[k]), rank_,
                                 selection_score=None if chosen is scores else float(chosen[k]), score=kind)
            if out_dir is not None:
                png = targets[(pi, finished[k])]
                sidecar = {"clipkit": __version__, "prompt": prompt, "seed": finished[k], "image": png.name,
                           "clip_score": img.clip_score, "score": kind,
                           "score_note": SCORE_NOTES[kind],
                           "rank": rank_, "candidates": n_cand, "models": models,
                           "parameters": parameters(cfg, n, seed),
                           "device": str(scorer.device), "precision": precision,
                           "size": list(img.image.size)}
                if placed:                  # the objects --layout grid scored (and guided) one by one
                    sidecar["layout"] = [asdict(p) for p in placed]
                if select is not None and (img.selection_score is not None or cfg.drafts > 1):
                    # the selector chose among the candidates, or among the drafts only (-n = candidates)
                    sidecar.update(selection=select.name, selection_score=img.selection_score,
                                   selection_weight=getattr(select, "weight", None))
                    if getattr(select, "spec", None):
                        sidecar["models"] = {**models, "selector": select.spec}
                write_image(img, png, sidecar, overwrite)
            kept.append(img)
    return GenerateResult(kept, cfg, models, n, seed, n_cand, time.time() - t0,
                          str(out_dir) if out_dir is not None else None)
