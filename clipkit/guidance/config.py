"""`generate`'s parameters: one config type, one unit for the guidance strength (``clip_scale``).

:class:`GenerateConfig` is what a user sets (the CLI's options, ``clipkit.generate``'s keywords) and what
every sidecar records; :meth:`GenerateConfig.guidance` is the one translation into the wrapper's
:class:`~clipkit.guidance.wrapper.GuidanceConfig` (``clip_scale`` is the RMS of each guided x0 step
with ``step_mode="normalized"``, the documented meaning; the wrapper's ``scale`` then stays 1).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from clipkit.core.errors import InputError
from clipkit.core.objectives import parse_negative, parse_weighted_path
from clipkit.core.profiles import layout_of
from clipkit.core.registry import parse_spec
from clipkit.guidance.schedulers import OUTPUT_ONLY, SCHEDULERS
from clipkit.guidance.wrapper import GuidanceConfig, parse_cut_schedule

#: bounds checked before anything is allocated (a 4096-px image is 16x Stable Diffusion XL's area)
MAX_SIZE, MAX_STEPS, MAX_TRAJECTORIES = 4096, 10_000, 1024
MAX_SEED = 2 ** 32        # seeds are in [0, 2^32); view noise uses seed + 2^32, so streams never collide

#: per guide target, what GenerateConfig's None fields mean (chosen on the development prompts of
#: bench/guidance.py, BENCHMARKS.md): guiding the x0 estimate, stop at t/T = 0.3 and let the model clean
#: up; guiding x_t with a noise-aware CLIP, guide to the end with steps in proportion to the noise left
TARGET_DEFAULTS = {"x0": {"guide_stop": 0.3, "step_schedule": "constant"},
                   "xt": {"guide_stop": 0.0, "step_schedule": "sigma"}}


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
    batch_size: int = 16            # a prompt's candidates (drafts) sampled together, at most this many per
                                    # batch (split evenly: pipeline.batches); 1: each alone, as diffusers'
                                    # pipelines do with a batch of one (a batch differs from that by float
                                    # rounding, ~1e-6, which can move a pixel by a level)
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
        for name, lo in (("views", 1), ("cutouts", 0), ("best_of", 1), ("drafts", 1), ("draft_steps", 1),
                         ("batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise InputError(f"{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.size is not None and (not isinstance(self.size, int) or isinstance(self.size, bool) or
                                      not 8 <= self.size <= MAX_SIZE):
            raise InputError(f"size must be an integer from 8 to {MAX_SIZE} pixels, got {self.size!r}")
        if self.steps > MAX_STEPS or self.best_of * self.drafts > MAX_TRAJECTORIES:
            raise InputError(f"at most {MAX_STEPS} steps and {MAX_TRAJECTORIES} trajectories (best-of x drafts) per "
                             f"kept image, got {self.steps} steps and {self.best_of * self.drafts}")
        if self.guide_target not in ("auto", "x0", "xt"):
            raise InputError(f"guide_target must be 'auto', 'x0' or 'xt', got {self.guide_target!r}")
        for name in ("tv_scale", "range_scale", "sat_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.layout, str):
            raise InputError(f"layout must be a name ('off', or one a profile offers), got {self.layout!r}")
        layout_of(self.layout)                       # an InputError naming the layouts the profiles offer
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


def make_config(config: GenerateConfig | None, options: dict) -> GenerateConfig:
    names = {f.name for f in fields(GenerateConfig)}
    bad = sorted(set(options) - names)
    if bad:
        raise InputError(f"unknown generate option(s) {', '.join(bad)}: choose from {', '.join(sorted(names))}")
    base = asdict(config) if config is not None else {}
    return GenerateConfig(**{**base, **options}).validate()


def steps_for_strength(run: int, strength: float) -> int:
    """The fewest schedule steps of which an img2img run at ``strength`` runs ``run`` (it runs
    ``int(steps * strength)``, as in diffusers)."""
    steps = max(1, int(run / strength))       # at most the answer: (that - 1) x strength < run
    while int(steps * strength) < run:
        steps += 1
    return steps
