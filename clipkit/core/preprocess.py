"""Image preprocessing, twice: a PIL path (what the backends do) and a differentiable torch path.

Both resize the shortest side to ``image_size`` with antialiased bicubic filtering, centre-crop a
square with the same rounding as torchvision's ``CenterCrop`` and normalise with the model's
mean/std. The torch path keeps gradients flowing to the pixels (used by guidance); tests check that
the two paths agree on real photographs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224               # side of the square CLIP input
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"      # "bicubic" or "bilinear"
    resize_mode: str = "shortest"       # "shortest" (resize + centre crop) or "squash" (resize to square)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        size = d.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            size = int(size[0])
        return cls(image_size=int(size), mean=tuple(d.get("mean", OPENAI_MEAN)),
                   std=tuple(d.get("std", OPENAI_STD)),
                   interpolation=d.get("interpolation", "bicubic"),
                   resize_mode=d.get("resize_mode", "shortest"))

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r} (bicubic, bilinear)")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r} (shortest, squash)")


def resized_shape(h: int, w: int, size: int, mode: str = "shortest") -> tuple[int, int]:
    """Shortest side -> ``size``, long side scaled and truncated, as torchvision's Resize(int)."""
    if mode == "squash":
        return size, size
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """Top/left of a centred ``size`` crop, rounded as torchvision's CenterCrop."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def pil_to_tensor(im: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, S, S] (the reference, non-differentiable path)."""
    s = cfg.image_size
    nh, nw = resized_shape(im.height, im.width, s, cfg.resize_mode)
    if (nh, nw) != (im.height, im.width):
        im = im.resize((nw, nh), _PIL_FILTERS[cfg.interpolation])
    top, left = crop_box(nh, nw, s)
    im = im.crop((left, top, left + s, top + s))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return normalize(x, cfg)


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def torch_preprocess(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Differentiable path: float pixels in [0, 1], shape [B, 3, H, W] (any H, W) -> [B, 3, S, S].

    Antialiased interpolation matters: without it the result drifts from the PIL path (cosine ~0.94
    on photographs, see FIELD_NOTES A).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(x.shape)}")
    s = cfg.image_size
    h, w = x.shape[-2:]
    nh, nw = resized_shape(h, w, s, cfg.resize_mode)
    if (nh, nw) != (h, w):
        downscale = nh < h or nw < w
        x = F.interpolate(x, size=(nh, nw), mode=cfg.interpolation, align_corners=False,
                          antialias=downscale)
    top, left = crop_box(nh, nw, s)
    x = x[..., top:top + s, left:left + s]
    return normalize(x, cfg)
