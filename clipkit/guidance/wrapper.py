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

Two targets for the CLIP loss (``GuidanceConfig.target``):

- ``"x0"`` (default): the CLIP sees the decoded x0 estimate (any CLIP; k-diffusion / Disco style).
- ``"xt"``: the CLIP sees the network input x_t itself, as ``(x_t + 1) / 2`` unclamped, exactly what
  ``train_clip(noise_aware=True)`` feeds it (GLIDE-style noise-aware CLIP, no timestep input). The
  gradient is taken w.r.t. x_t directly: no x0 estimate in the CLIP loss and no backprop through the
  network. Pixel models only.
"""
from __future__ import annotations

import inspect

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

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
    tv_scale: float = 0.0           # total-variation loss weight (on x0, in [0,1] pixels)
    range_scale: float = 0.0        # penalty on x0 outside [-1, 1]
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
        for name in ("scale", "tv_scale", "range_scale", "view_noise", "cut_power"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
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
        if not (0 <= self.stop <= self.start <= 1):
            raise InputError(f"need 0 <= stop <= start <= 1, got start={self.start}, stop={self.stop}")
        if self.grad_rms_max is not None and not self.grad_rms_max > 0:
            raise InputError("grad_rms_max must be > 0 (or None)")
        get_loss(self.loss)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


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
    """[B,3,H,W] in [0,1] -> [B*K,3,H,W]: K = views (+ cutouts) augmented copies, sample-major.

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
    return torch.stack(out, dim=1).reshape(B * len(out), C, H, W)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    return ((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
            + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean(dim=(1, 2, 3)))


@dataclass
class GuidanceStats:
    t: float
    loss: float
    similarity: float
    grad_rms: float


class GuidedDenoiser:
    """Wraps ``model(x, t) -> output`` (e.g. ``lambda x, t: unet(x, t).sample``) with CLIP guidance.

    Args:
        model: the denoiser; takes the VP input the scheduler hands the network.
        scheduler: the diffusers scheduler (for ``alphas_cumprod`` and ``prediction_type``).
        scorer: a :class:`~clipkit.core.scorer.ClipScorer` (its differentiable image path).
        targets: text embeddings per sample [B, M, D] (or [M, D] shared), unit norm.
        decode: maps x0 (model space) to pixels in [0, 1]; default ``(x0 + 1) / 2`` for pixel models.
    """

    def __init__(self, model: Callable, scheduler, scorer, targets: torch.Tensor, cfg: GuidanceConfig,
                 decode: Callable | None = None, generator: torch.Generator | None = None):
        self.model, self.scorer, self.cfg = model, scorer, cfg.validate()
        if cfg.target == "xt" and decode is not None:
            raise InputError("target='xt' feeds the CLIP the pixel-space x_t (a noise-aware CLIP); a latent "
                             "model (decode=...) needs target='x0'")
        self.abar = check_scheduler(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.T = len(self.abar)
        self.targets = targets
        self.decode = decode or (lambda x0: (x0 + 1) / 2)
        self.generator = generator
        self.loss_fn = get_loss(cfg.loss)
        self.history: list[GuidanceStats] = []
        self.pending_x0_shift: torch.Tensor | None = None   # for apply="sample": taken by `sample`

    def active(self, t) -> bool:
        frac = float(torch.as_tensor(t).flatten()[0]) / max(1, self.T - 1)
        return self.cfg.scale > 0 and self.cfg.stop <= frac <= self.cfg.start

    def clip_loss(self, x0: torch.Tensor, xt: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss [B] (scaled) and mean cosine [B] of the x0 estimate."""
        cfg = self.cfg
        # clamp forward, straight-through backward: a plain clamp would zero the gradient wherever the
        # estimate leaves [-1, 1], which at high noise is most pixels
        src = x0 + (x0.clamp(-1, 1) - x0).detach()
        if cfg.blend:
            fac = (1 - a).sqrt()
            src = src * fac + xt * (1 - fac)
        loss, cos = self.views_loss(self.decode(src).float())            # [B,3,H,W] in [0,1]
        return self.add_regularisers(loss, x0), cos

    def xt_loss(self, xt: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """target='xt': per-sample loss [B] (scaled) and mean cosine [B] of the CLIP on x_t itself.

        The CLIP sees ``(x_t + 1) / 2`` unclamped, as ``train_clip``'s ``noise_images`` feeds it;
        tv/range act on ``x0`` (pass it as a function of x_t with the network output held fixed).
        """
        loss, cos = self.views_loss((xt.float() + 1) / 2)
        return self.add_regularisers(loss, x0), cos

    def views_loss(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B,3,H,W] (about [0,1]) -> scaled CLIP loss [B] and mean cosine [B] over views and targets."""
        B = img.shape[0]
        views = make_views(img, self.cfg, self.generator)                # [B*K,...]
        K = views.shape[0] // B
        emb = self.scorer.embed_pixels(views).view(B, K, -1)             # [B,K,D]
        tgt = self.targets if self.targets.ndim == 3 else self.targets[None].expand(B, -1, -1)
        tgt = tgt.to(emb.device, emb.dtype)                              # [B,M,D]
        dist = self.loss_fn(emb[:, :, None, :], tgt[:, None, :, :])      # [B,K,M]
        loss = dist.mean(dim=(1, 2)) * self.cfg.scale
        cos = (F.normalize(emb, dim=-1)[:, :, None, :] * tgt[:, None]).sum(-1).mean(dim=(1, 2))
        return loss, cos

    def add_regularisers(self, loss: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.tv_scale:
            loss = loss + cfg.tv_scale * tv_loss(self.decode(x0))
        if cfg.range_scale:
            loss = loss + cfg.range_scale * (x0 - x0.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))
        return loss

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        a = abar_at(self.abar, t, x.shape[0], x.device)
        if not self.active(t):
            with torch.no_grad():
                return self.model(x, t)
        pt = self.prediction_type
        with torch.enable_grad():
            if self.cfg.target == "xt":
                with torch.no_grad():
                    out = self.model(x, t)
                eps, _ = split_output(out.float(), x.float(), a, pt)
                xg = x.detach().float().requires_grad_(True)
                x0 = (xg - (1 - a).sqrt() * eps) / a.sqrt()                  # for tv/range only; eps fixed
                loss, cos = self.xt_loss(xg, x0)
                (grad,) = torch.autograd.grad(loss.sum(), xg)               # d/dx_t through the CLIP only
            elif self.cfg.grad_mode == "unet":
                xg = x.detach().requires_grad_(True)
                out = self.model(xg, t)
                eps, x0 = split_output(out.float(), xg.float(), a, pt)
                loss, cos = self.clip_loss(x0, xg.float(), a)
                (grad,) = torch.autograd.grad(loss.sum(), xg)
                out, eps = out.detach(), eps.detach()
            else:
                with torch.no_grad():
                    out = self.model(x, t)
                eps, x0 = split_output(out.float(), x.float(), a, pt)
                x0g = x0.detach().requires_grad_(True)
                loss, cos = self.clip_loss(x0g, x.float(), a)
                (g0,) = torch.autograd.grad(loss.sum(), x0g)
                grad = g0 / a.sqrt()                                     # dx0/dx_t = 1/sqrt(abar), eps held fixed
        grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
        rms = grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        if self.cfg.grad_rms_max is not None and self.cfg.x0_step is None:
            grad = grad * (self.cfg.grad_rms_max / rms.clamp(min=self.cfg.grad_rms_max))
        stats = GuidanceStats(float(torch.as_tensor(t).flatten()[0]), float(loss.detach().mean()),
                              float(cos.detach().mean()), float(rms.mean()))
        if self.cfg.x0_step is not None:
            # normalised step in x0 space: x0' = x0 - step * grad / rms(grad)
            step = self.cfg.x0_step * ((1 - a).sqrt() if self.cfg.step_schedule == "sigma" else 1.0)
            delta = -step * grad / rms.clamp(min=1e-12)
        else:
            delta = -(1 - a) / a.sqrt() * grad                                       # x0' = x0 + sigma^2 g (VE form)
        self.history.append(stats)
        if self.cfg.apply == "sample":
            self.pending_x0_shift = delta.detach()
            return out.detach()
        eps_new = eps - a.sqrt() / (1 - a).sqrt() * delta                           # same x0', eps consistent
        return join_output(eps_new, x.float(), a, pt).to(out.dtype)


def _sample_space(guide: "GuidedDenoiser", scheduler, timesteps, i: int, x: torch.Tensor) -> torch.Tensor:
    """Factor mapping an x0-space shift into the scheduler's sample space after step i.

    The next network input is VP: x_vp = sqrt(abar_next) x0 + ...; the scheduler's sample relates to it by
    its own ``scale_model_input`` (1 for DDIM/DDPM/PNDM/DPM-Solver, sqrt(abar) for Euler/LMS), so a
    shift d of x0 is sqrt(abar_next) * d / input_scale in the sample. After the last step the sample is x0.
    """
    if i + 1 >= len(timesteps):
        return torch.ones((), device=x.device)
    t_next = timesteps[i + 1]
    a_next = abar_at(guide.abar, t_next, 1, x.device).flatten()[0]
    scale = scheduler.scale_model_input(torch.ones(1, device=x.device, dtype=torch.float32), t_next).flatten()[0]
    return a_next.sqrt() / scale


def sample(model: Callable, scheduler, shape: Sequence[int], steps: int, generator: torch.Generator,
           device="cpu", guide: GuidedDenoiser | None = None, callback=None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run any diffusers scheduler with (optionally guided) ``model``; returns the final x (model space).

    ``model(x, t)`` gets the scheduler's scaled input; noise comes only from ``generator``.
    ``noise``: the initial unit-variance noise of ``shape`` (default: drawn from ``generator``).
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    scheduler.set_timesteps(steps, device=device)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise InputError(f"initial noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise.float().to(device)
    else:
        x = torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    x = x * scheduler.init_noise_sigma
    fn = guide if guide is not None else model
    # the scheduler's parameters, not its local variables (co_varnames would list both)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    timesteps = list(scheduler.timesteps)
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        with torch.no_grad() if guide is None else torch.enable_grad():
            out = fn(x_in, t)
        x = scheduler.step(out.detach(), t, x, **extra).prev_sample
        if guide is not None and guide.pending_x0_shift is not None:
            x = x + _sample_space(guide, scheduler, timesteps, i, x) * guide.pending_x0_shift.to(x.dtype)
            guide.pending_x0_shift = None
        if callback is not None:
            callback(i, t, x)
    return x.detach()
