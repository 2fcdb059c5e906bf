"""Batched, anti-aliased renderer of Shapes scenes, in torch (CPU or GPU).

Scenes are packed into a float tensor ``params [B, K, 8]`` (K objects max):
``present, shape_id, cx, cy, radius, r, g, b`` with coordinates in canvas units [0, 1]. Coverage of
each object is computed analytically on a ``supersample``-times finer grid and box-filtered, so
edges are anti-aliased and the image is a pure function of the scene (deterministic).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from clipkit.shapes.world import COLORS, JITTER, RADIUS, SHAPES, SIZES, Scene

#: square half-side and triangle circumradius relative to the object radius
SQUARE_HALF = 0.85
TRIANGLE_R = 1.1
MAX_OBJECTS = 2


def pack(scenes: Sequence[Scene], max_objects: int = MAX_OBJECTS) -> torch.Tensor:
    """Scenes -> params [B, K, 8] (float32, CPU)."""
    out = torch.zeros(len(scenes), max_objects, 8)
    for i, sc in enumerate(scenes):
        for k, o in enumerate(sc.objects[:max_objects]):
            cx, cy = o.center
            out[i, k] = torch.tensor([1.0, SHAPES.index(o.shape), cx, cy, o.radius, *COLORS[o.color]])
    return out


def coverage(params: torch.Tensor, size: int, supersample: int = 4) -> torch.Tensor:
    """Per-object coverage in [0, 1]: params [B, K, 8] -> [B, K, size, size]."""
    B, K, _ = params.shape
    n = size * supersample
    coords = (torch.arange(n, device=params.device, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")                     # [n, n]
    p = params.float()
    dx = xs[None, None] - p[..., 2, None, None]                                # [B, K, n, n]
    dy = ys[None, None] - p[..., 3, None, None]
    r = p[..., 4, None, None]
    shape = p[..., 1, None, None]
    circle = (dx * dx + dy * dy) <= r * r
    square = torch.maximum(dx.abs(), dy.abs()) <= r * SQUARE_HALF
    # Equilateral triangle pointing up, centroid at the centre: inside iff the projection on each
    # outward edge normal (angles 0, 120, 240 deg, image y pointing down) is <= inradius = R/2.
    R = r * TRIANGLE_R
    s3 = math.sqrt(3) / 2
    tri = (dy <= R / 2) & (s3 * dx - 0.5 * dy <= R / 2) & (-s3 * dx - 0.5 * dy <= R / 2)
    inside = torch.where(shape < 0.5, circle, torch.where(shape < 1.5, square, tri))
    inside = inside & (p[..., 0, None, None] > 0.5)
    cov = inside.float().view(B * K, 1, n, n)
    if supersample > 1:
        cov = F.avg_pool2d(cov, supersample)
    return cov.view(B, K, size, size)


def render(params: torch.Tensor, size: int = 32, supersample: int = 4) -> torch.Tensor:
    """params [B, K, 8] -> RGB images [B, 3, size, size] in [0, 1] on a black background."""
    cov = coverage(params, size, supersample)                                   # [B, K, H, W]
    colors = params[..., 5:8].float()                                           # [B, K, 3]
    img = torch.einsum("bkhw,bkc->bchw", cov, colors)
    return img.clamp_(0, 1)


def render_scenes(scenes: Sequence[Scene], size: int = 32, supersample: int = 4,
                  device="cpu") -> torch.Tensor:
    return render(pack(scenes).to(device), size, supersample)


def to_pil(images: torch.Tensor):
    """[B, 3, H, W] in [0, 1] -> list of PIL images (uint8, rounded)."""
    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def random_params(batch: int, generator: torch.Generator, p_two: float = 0.35) -> torch.Tensor:
    """Random scenes drawn directly as params [B, 2, 8] on the generator's device (vectorised; used
    for training on accelerators, where per-scene Python sampling would starve the GPU).

    Same distribution as :func:`clipkit.shapes.world.sample_scene`: 1 or 2 objects (prob ``p_two``)
    in distinct cells, uniform shape, colour, size and cell, jitter in [-JITTER, JITTER].
    """
    dev = generator.device

    def randint(hi, *shape):
        return torch.randint(0, hi, shape, device=dev, generator=generator)

    cell0 = randint(9, batch)
    cell1 = (cell0 + 1 + randint(8, batch)) % 9                       # a different cell
    cells = torch.stack([cell0, cell1], 1)                             # [B, 2]
    present = torch.stack([torch.ones(batch, device=dev),
                           (torch.rand(batch, device=dev, generator=generator) < p_two).float()], 1)
    shape = randint(3, batch, 2).float()
    color = torch.tensor(list(COLORS.values()), device=dev)[randint(len(COLORS), batch, 2)]
    radii = torch.tensor([RADIUS[s] / 3 for s in SIZES], device=dev)[randint(2, batch, 2)]
    jit = (torch.rand(batch, 2, 2, device=dev, generator=generator) * 2 - 1) * JITTER
    cx = ((cells % 3).float() + 0.5 + jit[..., 0]) / 3
    cy = ((cells // 3).float() + 0.5 + jit[..., 1]) / 3
    return torch.cat([present[..., None], shape[..., None], cx[..., None], cy[..., None],
                      radii[..., None], color], dim=-1)
