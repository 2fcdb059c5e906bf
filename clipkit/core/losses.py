"""Distances between embeddings, computed in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from clipkit.core.errors import InputError


def _fp32_at_least(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def spherical_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """theta^2 / 2 between directions a and b (broadcasting over leading dims).

    ``|a - b| / 2 = sin(theta / 2)`` for unit vectors, so ``2 * arcsin(|a-b|/2)^2 = theta^2 / 2``:
    the loss of Crowson's CLIP-guided diffusion notebooks (FIELD_NOTES B).
    """
    a = F.normalize(_fp32_at_least(a), dim=-1)
    b = F.normalize(_fp32_at_least(b), dim=-1)
    return (a - b).norm(dim=-1).div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def cosine_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b)."""
    return 1 - F.cosine_similarity(_fp32_at_least(a), _fp32_at_least(b), dim=-1)


LOSSES = {"spherical": spherical_dist, "cosine": cosine_dist}


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
