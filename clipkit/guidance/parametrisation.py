"""The variance-preserving parametrisations of a diffusers scheduler: abar_t, and model output <-> (eps, x0).

Every diffusers DDPM-family scheduler feeds the network ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
(sigma schedulers such as Euler/LMS through ``scale_model_input``), so the guidance methods, the
samplers and the draft previews read ``abar_t`` from the scheduler's own ``alphas_cumprod`` and turn
a model output into an x0 estimate by ``prediction_type``, as ``DDIMScheduler.step`` does (DDIM,
arXiv 2010.02502, eq. 12; v-prediction: Salimans & Ho 2022, §4). No switch on scheduler classes.
"""
from __future__ import annotations

import torch

from clipkit.core.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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


def x0_estimate(scheduler, out: torch.Tensor, x_in: torch.Tensor, t) -> torch.Tensor | None:
    """The x0 estimate of a step (model space, fp32) from the model output ``out`` at the scaled input
    ``x_in``; None for a scheduler without a VP table or with a prediction type we do not know."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    pt = scheduler.config.get("prediction_type", "epsilon")
    if abar is None or pt not in PREDICTION_TYPES:
        return None
    a = abar_at(torch.as_tensor(abar, dtype=torch.float64), t, x_in.shape[0], x_in.device)
    return split_output(out.float(), x_in.float(), a, pt)[1]
