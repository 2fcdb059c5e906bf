"""CLIP guidance as a wrapper around a diffusers denoiser (k-diffusion style: one place, every scheduler).

Every diffusers scheduler feeds the network a variance-preserving input
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (sigma schedulers such as Euler/LMS do it through
``scale_model_input``). So guidance lives at the network: read ``abar_t`` from the scheduler's own
``alphas_cumprod`` (interpolated for fractional timesteps), turn the output into an x0 estimate by
``prediction_type``, take the CLIP loss of that estimate, and correct the output in the model's own
parametrisation (FIELD_NOTES B)::

    g    = -d(scale * L)/dx_t
    eps' = eps - sqrt(1 - abar_t) * g
    x0'  = (x_t - sqrt(1 - abar_t) eps') / sqrt(abar_t)
    v'   = sqrt(abar_t) eps' - sqrt(1 - abar_t) x0'

The scheduler then steps with the corrected output; no switch on scheduler classes, and the step
size is the same for DDIM, DDPM, Euler, LMS, PNDM and DPM-Solver.

What is optimised is an **objective** (:mod:`clipkit.core.objectives`): ``pixels in [0, 1] -> loss
[B]``, e.g. a CLIP text target, image prompts, negative prompts, an ensemble of CLIPs. The wrapper
averages it over augmented views (:class:`~clipkit.core.objectives.Views`, chunked so memory does not
grow with the number of cuts), adds the regularisers (tv, range, saturation on the x0 estimate) and
turns its gradient into a step. How the gradient is taken is a *method*, one module each in
:mod:`clipkit.guidance.methods` (x0 estimate, through the network, noise-aware x_t).

A :class:`GuidedDenoiser` is a pure closure over (model, scheduler, objective, config): nothing it
computes is kept from one call to the next (statistics leave through ``on_stats``). It is a denoiser
with the model's own signature (k-diffusion's ``make_cond_model_fn``) when the correction can be
expressed as a model output (``apply="output"``). ``apply="sample"`` (the default, stronger) moves the
x0 estimate but keeps the model's eps, which no single model output can express: :func:`guided_step`
makes a *step* ``(x, t) -> StepOutput`` that applies it to the scheduler's new sample, so a plain
diffusers loop (``for t in scheduler.timesteps: x = step(x, t).prev_sample``) samples with guidance
and the samplers (:mod:`clipkit.guidance.sampling`) know nothing of it.

Two targets for the CLIP loss (``GuidanceConfig.target``):

- ``"x0"`` (default): the CLIP sees the decoded x0 estimate (any CLIP; k-diffusion / Disco style).
- ``"xt"``: the CLIP sees the network input x_t itself, as ``(x_t + 1) / 2`` unclamped, exactly what
  ``train_clip(noise_aware=True)`` feeds it (GLIDE-style noise-aware CLIP, no timestep input). The
  gradient is taken w.r.t. x_t directly: no x0 estimate in the CLIP loss and no backprop through the
  network. Pixel models only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from clipkit.core.errors import InputError
from clipkit.core.losses import get_loss
from clipkit.core.objectives import range_excess, saturation, tv, viewed
from clipkit.guidance.methods import method_for
from clipkit.guidance.parametrisation import abar_at, check_scheduler, join_output, x0_estimate
from clipkit.guidance.sampling import Step, StepOutput, denoise_step, step_kwargs


@dataclass
class GuidanceConfig:
    scale: float = 300.0            # multiplies the CLIP loss (spherical distance, mean over views)
    loss: str = "spherical"         # spherical | cosine
    grad_mode: str = "x0"           # "x0": d/dx0 only (cheap) | "unet": through the diffusion network
    views: int = 4                  # augmented views per sample (translation jitter + noise), averaged
    jitter: int = 2                 # max translation in pixels for the views
    view_noise: float = 0.05        # Gaussian noise added to each view (pixel units in [0, 1])
    cutouts: int = 0                # random square crops per sample (on top of the views)
    cut_power: float = 1.0          # crop size ~ U^cut_power between min and full size
    blend: bool = False             # Crowson's blend: CLIP sees x0*fac + x_t*(1-fac), fac = sqrt(1-abar)
    grad_rms_max: float | None = 0.05   # cap the RMS of the pixel gradient (Disco: 0.05); None = off
    tv_scale: float = 0.0           # total-variation loss weight (on the x0 estimate's pixels in [0, 1])
    range_scale: float = 0.0        # mean squared excess of the x0 estimate's pixels outside [0, 1]
    sat_scale: float = 0.0          # mean absolute excess outside [0, 1] (Disco's saturation loss)
    cut_schedule: tuple | None = None   # Disco-style: ((views, cutouts), ...) for equal parts of the
                                    # trajectory from noise (t/T = 1) to clean; None: views/cutouts always
    view_chunk: int = 8             # views per CLIP forward; more run in chunks under checkpointing
    x0_step: float | None = None    # normalised steps: move x0 by this RMS (x0 units) along -grad per
                                    # step, instead of scale * grad (bounded at every noise level)
    step_schedule: str = "constant" # x0_step at every guided step ("constant"), or x0_step * sqrt(1 - abar_t)
                                    # ("sigma": in proportion to the noise left, fading out as t -> 0)
    apply: str = "sample"           # "sample": keep the model's eps, shift the scheduler's sample by the
                                    # x0 step (strong); "output": eps-consistent correction of the model
                                    # output only (classifier-guidance form; most of it cancels in DDIM)
    start: float = 1.0              # guide while t/T is in [stop, start] (1 = from pure noise)
    stop: float = 0.0
    target: str = "x0"              # what the CLIP sees: "x0" the x0 estimate | "xt" the noisy input x_t
                                    # (a noise-aware CLIP from `train clip --noise-aware`; pixel models)

    def validate(self) -> "GuidanceConfig":
        for name in ("scale", "tv_scale", "range_scale", "sat_scale", "view_noise", "cut_power"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"guidance {name} must be a non-negative number, got {v!r}")
        if self.apply not in ("sample", "output"):
            raise InputError(f"apply must be 'sample' or 'output', got {self.apply!r}")
        if self.grad_mode not in ("x0", "unet"):
            raise InputError(f"grad_mode must be 'x0' or 'unet', got {self.grad_mode!r}")
        if self.step_schedule not in ("constant", "sigma"):
            raise InputError(f"step_schedule must be 'constant' or 'sigma', got {self.step_schedule!r}")
        if self.target not in ("x0", "xt"):
            raise InputError(f"target must be 'x0' or 'xt', got {self.target!r}")
        if self.target == "xt" and (self.grad_mode != "x0" or self.blend):
            raise InputError("target='xt' takes the CLIP gradient w.r.t. x_t itself: grad_mode='unet' and "
                             "blend need target='x0'")
        if self.views < 1 or self.cutouts < 0 or self.jitter < 0:
            raise InputError("views must be >= 1, cutouts and jitter >= 0")
        if not isinstance(self.view_chunk, int) or self.view_chunk < 0:
            raise InputError(f"view_chunk must be an integer >= 0 (0: all views at once), got {self.view_chunk!r}")
        if self.cut_schedule is not None:
            self.cut_schedule = tuple(tuple(p) for p in self.cut_schedule)
            if not self.cut_schedule or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in self.cut_schedule):
                raise InputError("cut_schedule needs one or more (views >= 1, cutouts >= 0) pairs")
        if not (0 <= self.stop <= self.start <= 1):
            raise InputError(f"need 0 <= stop <= start <= 1, got start={self.start}, stop={self.stop}")
        if self.grad_rms_max is not None and not self.grad_rms_max > 0:
            raise InputError("grad_rms_max must be > 0 (or None)")
        get_loss(self.loss)
        return self

    def cuts_at(self, frac: float) -> tuple[int, int]:
        """(views, cutouts) at t/T = ``frac``: the cut schedule's part for it, else the fixed numbers."""
        if not self.cut_schedule:
            return self.views, self.cutouts
        n = len(self.cut_schedule)
        return tuple(self.cut_schedule[min(n - 1, int((1 - frac) * n))])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cut_schedule"] = None if self.cut_schedule is None else [list(p) for p in self.cut_schedule]
        return d


def parse_cut_schedule(text: str) -> tuple:
    """``"4+0,2+8"`` -> ((4, 0), (2, 8)): VIEWS+CUTOUTS for equal parts of the trajectory, from noise
    to clean (Disco's overview cuts are our views of the whole image, its inner cuts our cutouts)."""
    parts = []
    for raw in str(text).split(","):
        a, plus, b = raw.strip().partition("+")
        if not (a.isdigit() and (not plus or b.isdigit())) or int(a) < 1:
            raise InputError(f"--cut-schedule {text!r}: each part is VIEWS+CUTOUTS (e.g. 4+0,2+8), VIEWS >= 1")
        parts.append((int(a), int(b) if plus else 0))
    return tuple(parts)


def make_views(img: torch.Tensor, cfg: GuidanceConfig,
               generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [K*B,3,H,W]: K = views (+ cutouts) augmented copies, view-major (row r is
    a view of sample r % B, the layout :class:`~clipkit.core.objectives.Views` takes).

    Views are translation-jittered (replicate padding) and lightly noised; no flips (they would
    change left/right). Cutouts are random square crops resized back to H x W. ``generator``: one
    for the batch (every sample gets the same jitter), or one per sample (a list of B): then each
    sample's views are drawn from its own generator exactly as for that sample alone, so a sample's
    views do not depend on the batch it is in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != img.shape[0]:
            raise InputError(f"{len(generator)} view generators for a batch of {img.shape[0]}")
        if len(generator) == 1:
            return make_views(img, cfg, generator[0])
        per = [make_views(img[b:b + 1], cfg, g) for b, g in enumerate(generator)]     # each [K, 3, H, W]
        return torch.stack(per, dim=1).flatten(0, 1)                                  # view-major [K*B, ...]
    B, C, H, W = img.shape
    dev = img.device
    out = []
    for k in range(cfg.views):
        v = img
        if k > 0 and cfg.jitter > 0:
            dx, dy = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=generator,
                                   device=generator.device if generator is not None else "cpu").tolist()
            p = cfg.jitter
            v = F.pad(v, (p, p, p, p), mode="replicate")[..., p + dy:p + dy + H, p + dx:p + dx + W]
        if k > 0 and cfg.view_noise > 0:
            n = torch.randn(v.shape, generator=generator, device=generator.device if generator is not None else "cpu")
            v = v + cfg.view_noise * n.to(dev)
        out.append(v)
    for _ in range(cfg.cutouts):
        u = float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))
        size = max(4, int(min(H, W) * (0.5 + 0.5 * u ** cfg.cut_power)))
        gdev = generator.device if generator is not None else "cpu"     # a CUDA generator draws on CUDA
        oy = int(torch.randint(0, H - size + 1, (), generator=generator, device=gdev))
        ox = int(torch.randint(0, W - size + 1, (), generator=generator, device=gdev))
        crop = img[..., oy:oy + size, ox:ox + size]
        out.append(F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False))
    return torch.cat(out)


@dataclass
class GuidanceStats:
    t: float
    loss: float         # the scaled objective (+ regularisers), mean over the batch
    grad_rms: float


def clamp_st(pixels: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] forward, straight-through backward: a plain clamp would zero the gradient
    wherever the estimate leaves the range, which at high noise is most pixels."""
    return pixels + (pixels.clamp(0, 1) - pixels).detach()


@dataclass
class Correction:
    """What guidance makes of one network call at (x, t): the model's own output there, its eps, the
    x0-space shift ``delta`` guidance asks for (x0' = x0 + delta) and abar_t [B,1,1,1]."""
    out: torch.Tensor
    eps: torch.Tensor
    delta: torch.Tensor
    a: torch.Tensor


class GuidedDenoiser:
    """Guidance by an objective around ``model(x, t) -> output`` (e.g. ``lambda x, t: unet(x, t).sample``):
    a pure closure, nothing kept between calls.

    * ``correction(x, t)``: the :class:`Correction` at (x, t), None where guidance is off (the scale is 0
      or t/T is outside [stop, start]);
    * calling it: the denoiser ``(x, t) -> output`` with the eps-consistent correction of the output
      (``apply="output"``). ``apply="sample"`` cannot be a model output: use :func:`guided_step`.

    Args:
        model: the denoiser; takes the VP input the scheduler hands the network.
        scheduler: the diffusers scheduler (for ``alphas_cumprod`` and ``prediction_type``).
        objective: ``pixels in [0, 1] [R, 3, H, W] -> loss [R]`` (:mod:`clipkit.core.objectives`: a
            :class:`~clipkit.core.objectives.ClipTarget`, a weighted sum of them, ...). It receives
            views of a batch of B samples, view-major (row r belongs to sample r % B).
        cfg: step size, views/cutouts, regularisers, method.
        decode: model-space x0 -> pixels in [0, 1]; default ``(x0 + 1) / 2`` (pixel models).
        generator: the views' randomness: one generator, or one per sample of the batch (a list,
            which the caller may shorten in place when the batch drops rows: drafts).
        on_stats: called with a :class:`GuidanceStats` after every guided call (logs, plots, tests).
    """

    def __init__(self, model: Callable, scheduler, objective: Callable, cfg: GuidanceConfig,
                 decode: Callable | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 on_stats: Callable[[GuidanceStats], None] | None = None):
        self.model, self.objective, self.cfg = model, objective, cfg.validate()
        if cfg.target == "xt" and decode is not None:
            raise InputError("target='xt' feeds the CLIP the pixel-space x_t (a noise-aware CLIP); a latent "
                             "model (decode=...) needs target='x0'")
        self.method = method_for(cfg)
        self.abar = check_scheduler(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.T = len(self.abar)
        self.decode = decode or (lambda x0: (x0 + 1) / 2)
        self.generator = generator
        self.on_stats = on_stats

    def frac(self, t) -> float:
        return float(torch.as_tensor(t).flatten()[0]) / max(1, self.T - 1)

    def active(self, t) -> bool:
        return self.cfg.scale > 0 and self.cfg.stop <= self.frac(t) <= self.cfg.start

    # ---- the loss the methods differentiate
    def views_loss(self, pixels: torch.Tensor, t, objective: Callable | None = None) -> torch.Tensor:
        """scale x the objective's mean over this step's views of ``pixels`` [B,3,H,W] -> [B]."""
        objective = objective or self.objective
        views, cutouts = self.cfg.cuts_at(self.frac(t))
        vcfg = dataclasses.replace(self.cfg, views=views, cutouts=cutouts)
        chunk = self.cfg.view_chunk or (views + cutouts)
        return viewed(objective, lambda p: make_views(p, vcfg, self.generator), chunk)(pixels) * self.cfg.scale

    def regularisers(self, x0: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor | float:
        """tv / range / saturation of the x0 estimate's pixels (unclamped; ``pixels``: already decoded), [B] or 0."""
        cfg, loss = self.cfg, 0.0
        if cfg.tv_scale or cfg.range_scale or cfg.sat_scale:
            pix = self.decode(x0).float() if pixels is None else pixels
            for scale, fn in ((cfg.tv_scale, tv), (cfg.range_scale, range_excess), (cfg.sat_scale, saturation)):
                if scale:
                    loss = loss + scale * fn(pix)
        return loss

    def x0_loss(self, x0: torch.Tensor, xt: torch.Tensor, a: torch.Tensor, t) -> torch.Tensor:
        """The objective seeing the decoded x0 estimate (clamped straight-through) -> loss [B]."""
        src = x0
        if self.cfg.blend:
            fac = (1 - a).sqrt()
            src = x0 * fac + xt * (1 - fac)
        pix = self.decode(src).float()                # one decode (a VAE pass on latent models)
        return self.views_loss(clamp_st(pix), t) + self.regularisers(x0, None if self.cfg.blend else pix)

    def xt_loss(self, xt: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """The objective seeing ``(x_t + 1) / 2`` unclamped, as ``train_clip``'s ``noise_images`` feeds a
        noise-aware CLIP; the regularisers act on ``x0`` (a function of x_t, network output fixed).
        An objective with ``at(abar)`` (image prompts: :meth:`~clipkit.core.objectives.ClipTarget.at`)
        is first matched to this step's noise level."""
        objective = self.objective
        if hasattr(objective, "at"):
            objective = objective.at(float(abar_at(self.abar, t, 1, "cpu").flatten()[0]))
        return self.views_loss((xt.float() + 1) / 2, t, objective) + self.regularisers(x0)

    # ---- the correction, and the denoiser
    def correction(self, x: torch.Tensor, t) -> Correction | None:
        """The method's gradient at (x, t) made a bounded x0-space step (module docstring); None where
        guidance is off."""
        if not self.active(t):
            return None
        a = abar_at(self.abar, t, x.shape[0], x.device)
        with torch.enable_grad():
            out, eps, grad, loss = self.method(self, x, t, a)
        grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
        rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        if self.cfg.grad_rms_max is not None and self.cfg.x0_step is None:
            grad = grad * (self.cfg.grad_rms_max / rms.clamp(min=self.cfg.grad_rms_max))
        if self.on_stats is not None:
            self.on_stats(GuidanceStats(float(torch.as_tensor(t).flatten()[0]), float(loss.detach().mean()),
                                        float(rms.mean())))
        if self.cfg.x0_step is not None:
            # normalised step in x0 space: x0' = x0 - step * grad / rms(grad)
            step = self.cfg.x0_step * ((1 - a).sqrt() if self.cfg.step_schedule == "sigma" else 1.0)
            delta = -step * grad / rms.clamp(min=1e-12)
        else:
            delta = -(1 - a) / a.sqrt() * grad                                       # x0' = x0 + sigma^2 g (VE form)
        return Correction(out.detach(), eps.detach(), delta.detach(), a)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if self.cfg.apply == "sample":
            raise InputError("apply='sample' moves the scheduler's sample, which no model output can express: "
                             "sample with guided_step(...) (or use apply='output' for a guided denoiser)")
        c = self.correction(x, t)
        if c is None:
            with torch.no_grad():
                return self.model(x, t)
        eps_new = c.eps - c.a.sqrt() / (1 - c.a).sqrt() * c.delta                  # same x0', eps consistent
        return join_output(eps_new, x.float(), c.a, self.prediction_type).to(c.out.dtype)


def sample_space(scheduler, t, x: torch.Tensor) -> torch.Tensor:
    """Factor mapping an x0-space shift into the scheduler's sample space after the step at ``t``.

    The next network input is VP: x_vp = sqrt(abar_next) x0 + ...; the scheduler's sample relates to it by
    its own ``scale_model_input`` (1 for DDIM/DDPM/PNDM/DPM-Solver, sqrt(abar) for Euler/LMS), so a
    shift d of x0 is sqrt(abar_next) * d / input_scale in the sample. After the last step the sample is x0.
    The next timestep is the one after ``t`` in ``scheduler.timesteps``.
    """
    timesteps = scheduler.timesteps
    hits = (timesteps == torch.as_tensor(t, dtype=timesteps.dtype, device=timesteps.device)).nonzero()
    if not len(hits):
        raise InputError(f"timestep {t!r} is not in the scheduler's timesteps: call set_timesteps first")
    i = int(hits[0])
    if i + 1 >= len(timesteps):
        return torch.ones((), device=x.device)
    t_next = timesteps[i + 1]
    a_next = abar_at(check_scheduler(scheduler), t_next, 1, x.device).flatten()[0]
    scale = scheduler.scale_model_input(torch.ones(1, device=x.device, dtype=torch.float32), t_next).flatten()[0]
    return a_next.sqrt() / scale


def guided_step(model: Callable, scheduler, objective: Callable, cfg: GuidanceConfig,
                decode: Callable | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                noise_generator: torch.Generator | Sequence[torch.Generator] | None = None,
                on_stats: Callable[[GuidanceStats], None] | None = None) -> Step:
    """A guided step ``(x, t) -> StepOutput`` for any loop over ``scheduler.timesteps``
    (:mod:`clipkit.guidance.sampling`); the arguments are :class:`GuidedDenoiser`'s, plus
    ``noise_generator`` for a stochastic scheduler's own noise (DDPM, Euler ancestral; a list of one
    per sample draws each sample's noise as it would be drawn alone, as diffusers' ``randn_tensor`` does).

    ``apply="output"``: the plain step of the guided denoiser. ``apply="sample"``: the scheduler steps
    with the model's own output, then the new sample moves by the x0 shift mapped into sample space
    (:func:`sample_space`). A pure closure: nothing is kept between calls.
    """
    guide = GuidedDenoiser(model, scheduler, objective, cfg, decode=decode, generator=generator, on_stats=on_stats)
    if cfg.apply == "output":
        return denoise_step(guide, scheduler, noise_generator)
    extra = step_kwargs(scheduler, noise_generator)

    def step(x: torch.Tensor, t) -> StepOutput:
        x_in = scheduler.scale_model_input(x, t)
        c = guide.correction(x_in, t)
        if c is None:
            with torch.no_grad():
                out = model(x_in, t).detach()
        else:
            out = c.out
        x0 = x0_estimate(scheduler, out, x_in, t)
        prev = scheduler.step(out, t, x, **extra).prev_sample
        if c is not None:
            prev = prev + sample_space(scheduler, t, prev) * c.delta.to(prev.dtype)
        return StepOutput(prev.detach(), x0)
    return step
