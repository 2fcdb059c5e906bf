"""The objective on x_t itself (GLIDE-style noise-aware CLIP); the gradient is taken w.r.t. x_t through
the CLIP only. The regularisers see the x0 estimate as a function of x_t with eps held fixed.

Without regularisers the CLIP's gradient does not depend on the network's output, so the two run at
once when a CPU core is spare (the network on a worker thread, the CLIP forward and backward on the
caller's): the same operations on the same inputs, so the same numbers, in about the time of the
slower of the two (BENCHMARKS.md, "Speed of the main job")."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from clipkit.guidance.parametrisation import split_output

_POOL: list = []
#: run the network beside the CLIP when a core is spare (set False to run them one after the other)
OVERLAP = True


def _worker() -> ThreadPoolExecutor | None:
    """The one worker thread for the network, when torch leaves a core unused (its intra-op threads
    fewer than the cores); None otherwise."""
    if not OVERLAP or torch.get_num_threads() >= (os.cpu_count() or 1):
        return None
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipkit-unet"))
    return _POOL[0]


def _forward(model, x: torch.Tensor, t) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t)


def gradient(guide, x: torch.Tensor, t, a: torch.Tensor):
    cfg = guide.cfg
    pool = None if (cfg.tv_scale or cfg.range_scale or cfg.sat_scale) else _worker()
    if pool is not None:
        future = pool.submit(_forward, guide.model, x, t)
        try:
            xg = x.detach().float().requires_grad_(True)
            loss = guide.xt_loss(xg, None, t)               # no regulariser reads the x0 estimate
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        finally:
            out = future.result()
        eps, _ = split_output(out.float(), x.float(), a, guide.prediction_type)
        return out, eps, grad, loss
    with torch.no_grad():
        out = guide.model(x, t)
    eps, _ = split_output(out.float(), x.float(), a, guide.prediction_type)
    xg = x.detach().float().requires_grad_(True)
    x0 = (xg - (1 - a).sqrt() * eps) / a.sqrt()
    loss = guide.xt_loss(xg, x0, t)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    return out, eps, grad, loss
