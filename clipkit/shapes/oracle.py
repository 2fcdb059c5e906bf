"""The oracle: reads Shapes attributes back from pixels alone (no learned model).

1. Foreground intensity = max over RGB minus the median (the background level).
2. Connected components of the smoothed foreground (label propagation with max-pooling).
3. Per component: colour = nearest palette colour of its brightness-normalised mean RGB; position =
   grid cell of its intensity-weighted centroid; shape and size = the best of six templates
   (3 shapes x 2 sizes) rendered by :mod:`clipkit.shapes.render` at that centroid (least squared
   error on the coverage map). A component whose best template still explains it poorly is marked
   ``valid=False`` (used to judge generated samples).

It judges generations and captions, so it stays independent of every learned model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import permutations

import torch
import torch.nn.functional as F

from clipkit.shapes.render import render
from clipkit.shapes.world import COLORS, POSITIONS, RADIUS, SHAPES, SIZES

# Imported where used: numpy (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

_PALETTE = torch.tensor(list(COLORS.values()))             # [7, 3]
_COLOR_NAMES = list(COLORS)
THRESHOLD = 0.35          # foreground threshold on the smoothed intensity
MIN_AREA_FRAC = 0.35      # components smaller than this fraction of a small circle are ignored
MAX_ERROR = 0.35          # relative template error above which an object is not a valid Shapes object


@dataclass
class OracleObject:
    shape: str
    color: str
    size: str
    position: str
    area: float           # pixels of coverage
    error: float          # relative squared error of the best template (0 = perfect)
    valid: bool

    def attributes(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


def _as_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        return x[0] if x.ndim == 4 else x
    import numpy as np
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels (0 = background) of a bool mask [H, W]."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask
    m = mask.view(1, 1, h, w).float()
    for _ in range(h * w):
        new = F.max_pool2d(labels, 3, 1, 1) * m
        if torch.equal(new, labels):
            break
        labels = new
    return labels[0, 0].long()


def read_attributes(image, threshold: float = THRESHOLD) -> list[OracleObject]:
    """Objects found in ``image`` (PIL or tensor [3, H, W] in [0, 1]), in reading order."""
    x = _as_tensor(image).clamp(0, 1)
    _, h, w = x.shape
    inten = x.max(dim=0).values
    inten = (inten - inten.median()).clamp(min=0)
    smooth = F.avg_pool2d(F.pad(inten[None, None], (1, 1, 1, 1), mode="replicate"), 3, 1)[0, 0]
    labels = _components(smooth > threshold)
    small_area = 3.14159 * (RADIUS["small"] / 3 * w) ** 2
    comps = []
    for lab in labels.unique().tolist():
        if lab == 0:
            continue
        region = labels == lab
        # grow by one pixel to take in the anti-aliased rim
        grown = F.max_pool2d(region[None, None].float(), 3, 1, 1)[0, 0] > 0
        cov = inten * grown
        area = float(cov.sum())
        if area < MIN_AREA_FRAC * small_area:
            continue
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        cx, cy = float((cov * xs).sum() / area) / w, float((cov * ys).sum() / area) / h
        core = region & (smooth > 0.6)
        px = x[:, core] if core.any() else x[:, region]
        mean = px.mean(dim=1)
        mean = mean / mean.max().clamp(min=1e-6)
        color = _COLOR_NAMES[int(((_PALETTE - mean) ** 2).sum(dim=1).argmin())]
        comps.append((cov, cx, cy, area, color))
    if not comps:
        return []
    # Template matching: 6 templates per component, rendered at its centroid.
    params = torch.zeros(len(comps) * 6, 1, 8)
    combos = [(s, z) for s in range(3) for z in SIZES]
    for i, (_, cx, cy, _, _) in enumerate(comps):
        for j, (s, z) in enumerate(combos):
            params[i * 6 + j, 0] = torch.tensor([1.0, s, cx, cy, RADIUS[z] / 3, 1, 1, 1])
    templates = render(params, size=w).max(dim=1).values.view(len(comps), 6, h, w)
    out = []
    for i, (cov, cx, cy, area, color) in enumerate(comps):
        err = ((templates[i] - cov[None]) ** 2).sum(dim=(1, 2)) / max(area, 1e-6)   # [6]
        j = int(err.argmin())
        shape, size = SHAPES[combos[j][0]], combos[j][1]
        col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
        e = float(err[j])
        out.append(OracleObject(shape, color, size, POSITIONS[row * 3 + col], area, e, e <= MAX_ERROR))
    out.sort(key=lambda o: POSITIONS.index(o.position))
    return out


def matches(found: list[OracleObject], expected: dict, keys=("shape", "color", "size", "position")) -> bool:
    """Whether some found object has all ``keys`` of ``expected`` (a dict of attributes)."""
    return any(all(getattr(o, k) == expected[k] for k in keys if k in expected) for o in found)


def strict_match(found: list[OracleObject], expected: list[dict]) -> bool:
    """How a person judges a generated scene: exactly as many objects as the prompt names, every one
    explained by the oracle (``valid``), and a one-to-one pairing in which each named object's every
    attribute is right (an attribute the prompt leaves out is free). ``matches`` is the lenient
    judge: some object, among any others, has the attributes."""
    if len(found) != len(expected) or not all(o.valid for o in found):
        return False
    return any(all(getattr(o, k) == e[k] for o, e in zip(perm, expected) for k in e)
               for perm in permutations(found))


def to_dicts(found: list[OracleObject]) -> list[dict]:
    return [asdict(o) for o in found]
