"""The objective on x_t itself (GLIDE-style noise-aware CLIP); the gradient is taken w.r.t. x_t through
the CLIP only. The regularisers see the x0 estimate as a function of x_t with eps held fixed."""
from __future__ import annotations

import torch

from clipkit.guidance.parametrisation import split_output


def gradient(guide, x: torch.Tensor, t, a: torch.Tensor):
    with torch.no_grad():
        out = guide.model(x, t)
    eps, _ = split_output(out.float(), x.float(), a, guide.prediction_type)
    xg = x.detach().float().requires_grad_(True)
    x0 = (xg - (1 - a).sqrt() * eps) / a.sqrt()
    loss = guide.xt_loss(xg, x0, t)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    return out, eps, grad, loss
