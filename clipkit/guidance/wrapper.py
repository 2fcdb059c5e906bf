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

A :class:`GuidedDenoiser` is a denoiser with the model's own signature (k-diffusion's
``make_cond_model_fn``): with ``apply="output"`` it is all there is. ``apply="sample"`` (the default,
stronger) moves the x0 estimate but keeps the model's eps, which no single model output can express;
the sampler's documented ``after_step`` hook (:func:`sample`) applies that shift after the scheduler
step, and samplers otherwise know nothing of guidance.

Two targets for the CLIP loss (``GuidanceConfig.target``):

- ``"x0"`` (default): the CLIP sees the decoded x0 estimate (any CLIP; k-diffusion / Disco style).
- ``"xt"``: the CLIP sees the network input x_t itself, as ``(x_t + 1) / 2`` unclamped, exactly what
  ``train_clip(noise_aware=True)`` feeds it (GLIDE-style noise-aware CLIP, no timestep input). The
  gradient is taken w.r.t. x_t directly: no x0 estimate in the CLIP loss and no backprop through the
  network. Pixel models only.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from clipkit.core.errors import InputError
from clipkit.core.losses import get_loss

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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


def check_scheduler(scheduler) -> torch.Tensor:
    """alphas_cumprod of a scheduler, or a clear error for one we cannot guide."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise InputError(f"{type(scheduler).__name__} has no alphas_cumprod table: CLIP guidance needs a "
                         "DDPM-family scheduler (DDIM, DDPM, Euler, Euler ancestral, LMS, DPM-Solver++, PNDM)")
    pt = scheduler.config.get("prediction_type", "epsilon")
    if pt not in PREDICTION_TYPES:
        raise InputError(f"unsupported prediction_type {pt!r} ({', '.join(PREDICTION_TYPES)})")
    return torch.as_tensor(abar, dtype=torch.float64)


def abar_at(abar: torch.Tensor, t, batch: int, device) -> torch.Tensor:
    """abar_t for (possibly fractional) timesteps, linear in t between table entries -> [B,1,1,1] fp32."""
    t = torch.as_tensor(t, dtype=torch.float64).flatten().cpu()
    t = t.expand(batch) if t.numel() == 1 else t
    t = t.clamp(0, len(abar) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(abar) - 1)
    w = t - lo
    a = abar[lo] * (1 - w) + abar[hi] * w
    return a.float().view(-1, 1, 1, 1).to(device)


def split_output(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str):
    """Model output -> (eps, x0) for a VP input x with abar a."""
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - s1 * eps) / sa
    elif prediction_type == "sample":
        x0 = out
        eps = (x - sa * x0) / s1
    else:  # v_prediction: v = sa*eps - s1*x0
        x0 = sa * x - s1 * out
        eps = s1 * x + sa * out
    return eps, x0


def join_output(eps: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """(eps, x) -> model output in its own parametrisation."""
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return eps
    x0 = (x - s1 * eps) / sa
    if prediction_type == "sample":
        return x0
    return sa * eps - s1 * x0


def make_views(img: torch.Tensor, cfg: GuidanceConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> [K*B,3,H,W]: K = views (+ cutouts) augmented copies, view-major (row r is
    a view of sample r % B, the layout :class:`~clipkit.core.objectives.Views` takes).

    Views are translation-jittered (replicate padding) and lightly noised; no flips (they would
    change left/right). Cutouts are random square crops resized back to H x W.
    """
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


class GuidedDenoiser:
    """Wraps ``model(x, t) -> output`` (e.g. ``lambda x, t: unet(x, t).sample``) with guidance by an
    objective; the result is again a denoiser ``(x, t) -> output``.

    Args:
        model: the denoiser; takes the VP input the scheduler hands the network.
        scheduler: the diffusers scheduler (for ``alphas_cumprod`` and ``prediction_type``).
        objective: ``pixels in [0, 1] [R, 3, H, W] -> loss [R]`` (:mod:`clipkit.core.objectives`: a
            :class:`~clipkit.core.objectives.ClipTarget`, a weighted sum of them, ...). It receives
            views of a batch of B samples, view-major (row r belongs to sample r % B).
        cfg: step size, views/cutouts, regularisers, method.
        decode: model-space x0 -> pixels in [0, 1]; default ``(x0 + 1) / 2`` (pixel models).
        generator: the views' randomness.
    """

    def __init__(self, model: Callable, scheduler, objective: Callable, cfg: GuidanceConfig,
                 decode: Callable | None = None, generator: torch.Generator | None = None):
        from clipkit.guidance.methods import method_for
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
        self.history: list[GuidanceStats] = []
        self.pending_shift: torch.Tensor | None = None   # apply="sample": this step's x0 shift, for after_step

    def frac(self, t) -> float:
        return float(torch.as_tensor(t).flatten()[0]) / max(1, self.T - 1)

    def active(self, t) -> bool:
        return self.cfg.scale > 0 and self.cfg.stop <= self.frac(t) <= self.cfg.start

    # ---- the loss the methods differentiate
    def views_loss(self, pixels: torch.Tensor, t, objective: Callable | None = None) -> torch.Tensor:
        """scale x the objective's mean over this step's views of ``pixels`` [B,3,H,W] -> [B]."""
        from clipkit.core.objectives import viewed
        objective = objective or self.objective
        views, cutouts = self.cfg.cuts_at(self.frac(t))
        vcfg = dataclasses.replace(self.cfg, views=views, cutouts=cutouts)
        chunk = self.cfg.view_chunk or (views + cutouts)
        return viewed(objective, lambda p: make_views(p, vcfg, self.generator), chunk)(pixels) * self.cfg.scale

    def regularisers(self, x0: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor | float:
        """tv / range / saturation of the x0 estimate's pixels (unclamped; ``pixels``: already decoded), [B] or 0."""
        from clipkit.core.objectives import range_excess, saturation, tv
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

    # ---- the denoiser
    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        a = abar_at(self.abar, t, x.shape[0], x.device)
        if not self.active(t):
            with torch.no_grad():
                return self.model(x, t)
        with torch.enable_grad():
            out, eps, grad, loss = self.method(self, x, t, a)
        grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
        rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        if self.cfg.grad_rms_max is not None and self.cfg.x0_step is None:
            grad = grad * (self.cfg.grad_rms_max / rms.clamp(min=self.cfg.grad_rms_max))
        self.history.append(GuidanceStats(float(torch.as_tensor(t).flatten()[0]), float(loss.detach().mean()),
                                          float(rms.mean())))
        if self.cfg.x0_step is not None:
            # normalised step in x0 space: x0' = x0 - step * grad / rms(grad)
            step = self.cfg.x0_step * ((1 - a).sqrt() if self.cfg.step_schedule == "sigma" else 1.0)
            delta = -step * grad / rms.clamp(min=1e-12)
        else:
            delta = -(1 - a) / a.sqrt() * grad                                       # x0' = x0 + sigma^2 g (VE form)
        out = out.detach()
        if self.cfg.apply == "sample":
            self.pending_shift = delta.detach()
            return out
        eps_new = eps.detach() - a.sqrt() / (1 - a).sqrt() * delta                  # same x0', eps consistent
        return join_output(eps_new, x.float(), a, self.prediction_type).to(out.dtype)

    def after_step(self, i: int, scheduler, timesteps: Sequence, x: torch.Tensor) -> torch.Tensor:
        """The sampler's hook after step ``i``: apply this step's x0 shift (``apply="sample"``) to the
        scheduler's new sample; a no-op otherwise."""
        if self.pending_shift is None:
            return x
        shift, self.pending_shift = self.pending_shift, None
        return x + _sample_space(self.abar, scheduler, timesteps, i, x) * shift.to(x.dtype)


def _sample_space(abar: torch.Tensor, scheduler, timesteps, i: int, x: torch.Tensor) -> torch.Tensor:
    """Factor mapping an x0-space shift into the scheduler's sample space after step i.

    The next network input is VP: x_vp = sqrt(abar_next) x0 + ...; the scheduler's sample relates to it by
    its own ``scale_model_input`` (1 for DDIM/DDPM/PNDM/DPM-Solver, sqrt(abar) for Euler/LMS), so a
    shift d of x0 is sqrt(abar_next) * d / input_scale in the sample. After the last step the sample is x0.
    """
    if i + 1 >= len(timesteps):
        return torch.ones((), device=x.device)
    t_next = timesteps[i + 1]
    a_next = abar_at(abar, t_next, 1, x.device).flatten()[0]
    scale = scheduler.scale_model_input(torch.ones(1, device=x.device, dtype=torch.float32), t_next).flatten()[0]
    return a_next.sqrt() / scale


def sample(model: Callable, scheduler, shape: Sequence[int], steps: int, generator: torch.Generator,
           device="cpu", callback=None, noise: torch.Tensor | None = None,
           after_step: Callable | None = None, init: torch.Tensor | None = None,
           strength: float = 1.0) -> torch.Tensor:
    """Run any diffusers scheduler with any denoiser ``model(x, t)``; returns the final x (model space).

    ``model(x, t)`` gets the scheduler's scaled input; noise comes only from ``generator``.
    ``noise``: the initial unit-variance noise of ``shape`` (default: drawn from ``generator``).
    ``after_step(i, scheduler, timesteps, x) -> x``: a hook on the new sample after step ``i`` (a
    guidance method that acts there, e.g. :meth:`GuidedDenoiser.after_step`); None: plain sampling.
    ``init`` (model space, ``shape``) with ``strength`` S in (0, 1]: run only the last
    ``max(1, int(steps * S))`` timesteps, starting from ``init`` noised to the first of them with the
    scheduler's own ``add_noise``, as diffusers' img2img pipelines do.
    ``callback(i, t, x)`` after every step. :func:`iter_sample` is the same loop, one step at a time.
    """
    x = None
    for state in iter_sample(model, scheduler, shape, steps, generator, device, noise, after_step, init, strength):
        x = state.x
        if callback is not None:
            callback(state.i, state.t, x)
    return x


@dataclass
class SampleState:
    """The sampler after step ``i`` of ``n``: the new sample and the x0 estimate of the step's input
    (model space, from the model's output: what a draft is judged by)."""
    i: int
    n: int
    t: object
    x: torch.Tensor
    x0: torch.Tensor


def iter_sample(model: Callable, scheduler, shape: Sequence[int], steps: int, generator: torch.Generator,
                device="cpu", noise: torch.Tensor | None = None, after_step: Callable | None = None,
                init: torch.Tensor | None = None, strength: float = 1.0) -> Iterator[SampleState]:
    """:func:`sample`'s loop as a generator: yields a :class:`SampleState` after every step, so a
    caller can stop a trajectory part-way, judge it, and go on with it later (drafts)."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise InputError(f"strength must be in (0, 1], got {strength!r}")
    scheduler.set_timesteps(steps, device=device)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise InputError(f"initial noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise.float().to(device)
    else:
        x = torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    timesteps = list(scheduler.timesteps)
    if init is None:
        x = x * scheduler.init_noise_sigma
    else:
        if tuple(init.shape) != tuple(shape):
            raise InputError(f"init has shape {tuple(init.shape)}, expected {tuple(shape)}")
        order = getattr(scheduler, "order", 1)
        if len(timesteps) != steps * order:     # e.g. PNDM's warm-up: the timesteps are not steps x order
            raise InputError(f"{type(scheduler).__name__} runs {len(timesteps)} timesteps for {steps} steps: an "
                             "init image cannot start part-way through them; use another scheduler (DDIM)")
        keep = max(1, min(steps, int(steps * strength)))
        skip = (steps - keep) * order
        timesteps = timesteps[skip:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skip)
        x = scheduler.add_noise(init.float().to(device), x, torch.as_tensor([timesteps[0]]))
    abar = getattr(scheduler, "alphas_cumprod", None)
    pt = scheduler.config.get("prediction_type", "epsilon")
    # the scheduler's parameters, not its local variables (co_varnames would list both)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = model(x_in, t).detach()
        x0 = None
        if abar is not None and pt in PREDICTION_TYPES:
            a = abar_at(torch.as_tensor(abar, dtype=torch.float64), t, x_in.shape[0], x_in.device)
            x0 = split_output(out.float(), x_in.float(), a, pt)[1]
        x = scheduler.step(out, t, x, **extra).prev_sample
        if after_step is not None:
            x = after_step(i, scheduler, timesteps, x)
        x = x.detach()
        yield SampleState(i, len(timesteps), t, x, x0)
