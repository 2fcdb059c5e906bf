"""Initial-noise optimisation (ReNO / DOODL style): gradient steps on the starting noise of a sampler.

The sampler is pure and deterministic given its noise (DDIM, eta = 0), so the image is a function
``chain(noise) -> pixels``. A short version of it (a few DDIM steps) is differentiable end to end;
the noise takes ``steps`` gradient steps on ``objective(chain(noise)) + reg * nll(noise)``, where
``nll`` is the negative log-likelihood of ``|noise|^2`` under the chi-square law it has when the
noise is standard Gaussian (ReNO's norm regulariser): the noise stays a plausible draw, so the
full sampler started from it still sees the prior it was trained on. Every network call in the
chain runs under activation checkpointing: memory is one call's activations, whatever the length.

The optimised noise then starts the ordinary (guided or not) sampler, so this composes with CLIP
guidance and with best-of selection. Deterministic: no randomness beyond the starting noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from clipkit.core.errors import InputError


@dataclass
class NoiseOptConfig:
    steps: int = 0                  # gradient steps on the initial noise (0 = off)
    chain_steps: int = 4            # DDIM steps of the differentiable chain that renders each proposal
    lr: float = 0.5                 # step size (normalised-gradient steps, in noise RMS units * sqrt(d))
    reg: float = 1.0                # weight of the Gaussian-norm regulariser (per dimension)
    keep_best: bool = True          # return the best noise seen (by the objective), not the last

    def validate(self) -> "NoiseOptConfig":
        if not isinstance(self.steps, int) or self.steps < 0:
            raise InputError(f"optimize-noise steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.chain_steps, int) or self.chain_steps < 1:
            raise InputError(f"the noise-optimisation chain needs >= 1 step, got {self.chain_steps!r}")
        for name in ("lr", "reg"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"noise-optimisation {name} must be a finite number >= 0, got {v!r}")
        return self


@dataclass
class NoiseOptResult:
    noise: torch.Tensor
    losses: list[float] = field(default_factory=list)      # objective (mean over the batch) per step
    best_step: int = 0


def gaussian_norm_nll(z: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL of ``r2 = |z|^2`` under chi-square(d), divided by d (up to a constant).

    Minimal at r2 = d - 2, i.e. where a standard Gaussian's norm concentrates."""
    d = z[0].numel()
    r2 = z.flatten(1).pow(2).sum(1)
    return (r2 / 2 - (d / 2 - 1) * torch.log(r2)) / d


def ddim_chain(model: Callable, scheduler, steps: int, checkpointed: bool = True) -> Callable:
    """``noise -> x_0`` by ``steps`` deterministic DDIM steps of ``model(x, t) -> output`` (any
    prediction type the scheduler knows), differentiable, with checkpointed network calls.

    ``scheduler`` is used for its config only; a fresh DDIM scheduler with ``eta = 0`` runs the chain.
    """
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    timesteps = list(sched.timesteps)

    def call(x, t):
        return model(x, t)

    def chain(noise: torch.Tensor) -> torch.Tensor:
        x = noise * sched.init_noise_sigma
        for t in timesteps:
            out = checkpoint(call, x, t, use_reentrant=False) if checkpointed and x.requires_grad else call(x, t)
            x = sched.step(out, t, x, eta=0.0).prev_sample
        return x
    return chain


def optimize_noise(noise: torch.Tensor, chain: Callable[[torch.Tensor], torch.Tensor],
                   objective: Callable[[torch.Tensor], torch.Tensor], cfg: NoiseOptConfig,
                   to_pixels: Callable[[torch.Tensor], torch.Tensor] = lambda x: (x + 1) / 2,
                   on_step: Callable[[int, float], None] | None = None) -> NoiseOptResult:
    """Take ``cfg.steps`` normalised gradient steps on ``noise`` [B, ...] (each sample on its own).

    Each step: loss_b = objective(to_pixels(chain(z)))_b + reg * nll(z_b); z_b moves by
    ``lr`` times its gradient scaled to unit RMS. Returns the best noise per sample (keep_best).
    """
    cfg.validate()
    z = noise.detach().float().clone()
    res = NoiseOptResult(z.clone())
    if cfg.steps == 0:
        return res
    best = torch.full((z.shape[0],), float("inf"))
    best_z = z.clone()
    for i in range(cfg.steps + 1):
        zg = z.detach().requires_grad_(i < cfg.steps)
        with torch.set_grad_enabled(i < cfg.steps):
            obj = objective(to_pixels(chain(zg)).float())                      # [B]
            loss = obj + cfg.reg * gaussian_norm_nll(zg)
        o = obj.detach().float().cpu()
        better = o < best
        best = torch.where(better, o, best)
        best_z[better] = z[better]
        res.losses.append(float(o.mean()))
        if on_step is not None:
            on_step(i, float(o.mean()))
        if i == cfg.steps:
            break
        (g,) = torch.autograd.grad(loss.sum(), zg)
        g = torch.nan_to_num(g.float())
        rms = g.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-12).view(-1, *[1] * (g.ndim - 1))
        z = (z - cfg.lr * g / rms).detach()
    res.noise = best_z if cfg.keep_best else z
    res.best_step = int(min(range(len(res.losses)), key=res.losses.__getitem__))
    return res
