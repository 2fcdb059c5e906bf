"""Guidance methods: how the gradient of the objective w.r.t. the network input x_t is taken.

Each method is a module with one function ``gradient(guide, x, t, a) -> (out, eps, grad, loss)``:
the model output at (x, t), its eps, d(loss)/d(x_t) [B, C, H, W] and the loss [B]. ``guide`` is the
:class:`~clipkit.guidance.wrapper.GuidedDenoiser` (its model, prediction type and losses; the
methods never import the wrapper). The
wrapper turns the gradient into a step; these modules only differentiate.

* :mod:`.x0` — the objective on the x0 estimate, d/dx0 with the network output held fixed (cheap; any CLIP).
* :mod:`.unet` — the objective on the x0 estimate, backpropagated through the network.
* :mod:`.xt` — the objective on x_t itself (a noise-aware CLIP; pixel models): no x0 estimate in the
  CLIP loss, no backprop through the network.
"""
from __future__ import annotations

from typing import Callable

from clipkit.guidance.methods import unet, x0, xt

METHODS: dict[str, Callable] = {"x0": x0.gradient, "unet": unet.gradient, "xt": xt.gradient}


def method_for(cfg) -> Callable:
    """The method a :class:`~clipkit.guidance.wrapper.GuidanceConfig` names: ``target="xt"`` -> xt,
    else its ``grad_mode`` (x0 | unet)."""
    return METHODS["xt" if cfg.target == "xt" else cfg.grad_mode]
