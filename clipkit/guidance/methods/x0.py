"""The objective on the x0 estimate; d/dx_t = d/dx0 / sqrt(abar_t) with the network output held fixed."""
from __future__ import annotations

import torch

from clipkit.guidance.parametrisation import split_output


def gradient(guide, x: torch.Tensor, t, a: torch.Tensor):
    with torch.no_grad():
        out = guide.model(x, t)
    eps, x0 = split_output(out.float(), x.float(), a, guide.prediction_type)
    x0g = x0.detach().requires_grad_(True)
    loss = guide.x0_loss(x0g, x.float(), a, t)
    (g0,) = torch.autograd.grad(loss.sum(), x0g)
    return out, eps, g0 / a.sqrt(), loss
