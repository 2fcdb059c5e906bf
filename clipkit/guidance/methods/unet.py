"""The objective on the x0 estimate, differentiated through the network (Disco's "through the UNet")."""
from __future__ import annotations

import torch

from clipkit.guidance.parametrisation import split_output


def gradient(guide, x: torch.Tensor, t, a: torch.Tensor):
    xg = x.detach().requires_grad_(True)
    out = guide.model(xg, t)
    eps, x0 = split_output(out.float(), xg.float(), a, guide.prediction_type)
    loss = guide.x0_loss(x0, xg.float(), a, t)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    return out.detach(), eps.detach(), grad, loss
