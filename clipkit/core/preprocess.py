"""Image preprocessing, twice: a PIL path (what the backends do) and a differentiable torch path.

One :class:`PreprocessConfig` describes both reference pipelines exactly:

* open_clip (``resize_backend="pil"``, ``crop_offset="round"``): PIL resizes the shortest side to
  ``image_size`` (torchvision's ``Resize(int)`` on a PIL image), ``CenterCrop`` rounds the offset
  half-to-even, then ``ToTensor`` (/255) and ``Normalize``.
* transformers 5 ``CLIPImageProcessor`` (``resize_backend="torchvision"``, ``crop_offset="floor"``):
  the image becomes a uint8 tensor, ``torchvision.transforms.v2.functional.resize`` (antialiased,
  the long side truncated as ``int(N * long / short)``) resizes the shortest edge to ``resize_size``
  (or to an exact height/width), the centre crop is ``crop_size`` (any height/width, zero padding
  when the image is smaller) with the offset floored, then rescale and normalise fused as
  ``(x - mean / f) / (std / f)`` on 0..255 values (``f = rescale_factor``).

The torch path keeps gradients flowing to the pixels (used by guidance) and follows the same
geometry (sizes, crop offsets, padding); its resampling is float (no uint8 rounding), so it agrees
with the PIL path closely but not bit for bit (tests check it on real photographs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Imported where used: torchvision (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "squash", "none")
CROP_OFFSETS = ("round", "floor")
RESIZE_BACKENDS = ("pil", "torchvision")


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise ValueError(f"expected (height, width), got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _triple(v, name: str) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    t = tuple(float(x) for x in v)
    if len(t) == 1:
        return t * 3
    if len(t) != 3:
        raise ValueError(f"{name} needs 3 values (RGB), got {len(t)}")
    return t


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's pixel tensor. The defaults (and every config saved before
    the transformers fields existed) are the open_clip pipeline."""
    image_size: int = 224               # side of the square CLIP input (crop height if crop_size is set)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"      # "bicubic", "bilinear" or "nearest" (nearest: torchvision only)
    resize_mode: str = "shortest"       # "shortest" (shortest edge -> resize_size), "squash" (exact
                                        # height/width) or "none" (no resize, transformers do_resize=False)
    # ---- transformers CLIPImageProcessor fields (defaults: the open_clip behaviour above) ----
    resize_size: int | tuple[int, int] | None = None   # shortest: edge N; squash: (h, w); None: image_size
    crop_size: tuple[int, int] | None = None           # (h, w) of the centre crop; None: image_size square
    do_center_crop: bool = True
    crop_offset: str = "round"          # "round" (torchvision CenterCrop) or "floor" (transformers)
    resize_backend: str = "pil"         # "pil" (PIL Image.resize) or "torchvision" (uint8 tensor, antialiased)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True         # images are always decoded to RGB (clipkit.core.io.load_image)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unsupported interpolation {self.interpolation!r} (bicubic, bilinear, nearest)")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unsupported resize_mode {self.resize_mode!r} (shortest, squash, none)")
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"unsupported crop_offset {self.crop_offset!r} (round, floor)")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"unsupported resize_backend {self.resize_backend!r} (pil, torchvision)")
        if self.interpolation == "nearest" and self.resize_backend != "torchvision":
            raise ValueError("nearest interpolation is only supported with resize_backend='torchvision'")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("image_size", int(self.image_size))
        set_("mean", _triple(self.mean, "mean"))
        set_("std", _triple(self.std, "std"))
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        if self.resize_size is not None:
            rs = self.resize_size
            if self.resize_mode == "shortest":
                if isinstance(rs, (list, tuple)):
                    raise ValueError(f"resize_mode 'shortest' takes one edge length, got {rs!r}")
                set_("resize_size", int(rs))
            else:
                set_("resize_size", _pair(rs))
        if self.crop_size is not None:
            set_("crop_size", _pair(self.crop_size))
        set_("rescale_factor", float(self.rescale_factor))
        sizes = [self.image_size, *self.crop_hw, *(_pair(self.resize_size) if self.resize_size else ())]
        if min(sizes) < 1:
            raise ValueError(f"sizes must be >= 1, got {sizes}")
        if not self.do_center_crop and self.resize_mode != "squash":
            raise ValueError("without a centre crop the resize must give a fixed height and width "
                             "(the model input size would depend on the image)")

    # ---- derived geometry --------------------------------------------------------------------
    @property
    def do_resize(self) -> bool:
        return self.resize_mode != "none"

    @property
    def crop_hw(self) -> tuple[int, int]:
        return self.crop_size if self.crop_size is not None else (self.image_size, self.image_size)

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if self.do_center_crop:
            return self.crop_hw
        return self.resized_hw(1, 1)   # squash: fixed size whatever the image

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after the resize step for an ``h`` x ``w`` image."""
        if self.resize_mode == "none":
            return h, w
        target = self.resize_size if self.resize_size is not None else self.image_size
        if self.resize_mode == "squash":
            return _pair(target)
        return resized_shape(h, w, int(target))

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """All fields; the transformers fields only where they differ from their defaults, so a
        config of the original five fields keeps its dict (and cache keys) unchanged."""
        d = asdict(self)
        for f in fields(self)[5:]:
            if d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        size = d.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            size = int(size[0])
        kw = {k: d[k] for k in (f.name for f in fields(cls)[5:]) if d.get(k) is not None}
        return cls(image_size=int(size), mean=tuple(d.get("mean") or OPENAI_MEAN),
                   std=tuple(d.get("std") or OPENAI_STD),
                   interpolation=d.get("interpolation") or "bicubic",
                   resize_mode=d.get("resize_mode") or "shortest", **kw)


def resized_shape(h: int, w: int, size: int, mode: str = "shortest") -> tuple[int, int]:
    """Shortest side -> ``size``, long side scaled and truncated (``int(size * long / short)``), as
    torchvision's Resize(int) and transformers' ``get_resize_output_image_size``."""
    if mode == "squash":
        return size, size
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def crop_box(h: int, w: int, size, rounding: str = "round") -> tuple[int, int]:
    """Top/left of a centred crop of ``size`` (int or (h, w)) inside an image at least that large:
    rounded half-to-even as torchvision's CenterCrop, or floored as transformers."""
    ch, cw = _pair(size)
    if rounding == "floor":
        return (h - ch) // 2, (w - cw) // 2
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


def center_crop(x: torch.Tensor, size, rounding: str = "round") -> torch.Tensor:
    """Centre crop of the last two dims; an image smaller than the crop is first zero-padded
    (left/top get ``(c - s) // 2``, the rest on the other side), as torchvision and transformers do."""
    ch, cw = _pair(size)
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pw, ph = max(cw - w, 0), max(ch - h, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), value=0)
        h, w = x.shape[-2:]
        if (h, w) == (ch, cw):
            return x
    top, left = crop_box(h, w, (ch, cw), rounding)
    return x[..., top:top + ch, left:left + cw]


_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


def pil_to_tensor(im: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB PIL image -> model input float tensor [3, H, W] (the reference, non-differentiable path)."""
    if cfg.resize_backend == "torchvision":
        return _pil_to_tensor_torchvision(im, cfg)
    if cfg.do_resize:
        nh, nw = cfg.resized_hw(im.height, im.width)
        if (nh, nw) != (im.height, im.width):
            im = im.resize((nw, nh), _PIL_FILTERS[cfg.interpolation])
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    if cfg.do_center_crop:
        x = center_crop(x, cfg.crop_hw, cfg.crop_offset)
    x = x.float()
    if cfg.do_rescale:
        x = x.div_(255) if cfg.rescale_factor == 1 / 255 else x.mul_(cfg.rescale_factor)
    return normalize(x, cfg) if cfg.do_normalize else x


def _pil_to_tensor_torchvision(im: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """transformers 5 ``CLIPImageProcessor`` (its torchvision backend), step by step."""
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()   # uint8 [3, H, W]
    if cfg.do_resize:
        nh, nw = cfg.resized_hw(im.height, im.width)
        if (nh, nw) != (im.height, im.width):
            from torchvision.transforms.v2 import InterpolationMode
            from torchvision.transforms.v2 import functional as tvF
            mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                    "nearest": InterpolationMode.NEAREST_EXACT}[cfg.interpolation]
            x = tvF.resize(x[None], [nh, nw], interpolation=mode, antialias=True)[0]
    if cfg.do_center_crop:
        x = center_crop(x, cfg.crop_hw, cfg.crop_offset)
    x = x.to(torch.float32)
    if cfg.do_normalize:
        mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
        if cfg.do_rescale:      # fused as transformers does: (x - mean / f) / (std / f)
            mean, std = mean * (1.0 / cfg.rescale_factor), std * (1.0 / cfg.rescale_factor)
        return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return x * cfg.rescale_factor if cfg.do_rescale else x


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def torch_preprocess(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Differentiable path: float pixels in [0, 1], shape [B, 3, H, W] (any H, W) -> model input.

    Same geometry as :func:`pil_to_tensor`. Antialiased interpolation matters: without it the result
    drifts from the PIL path (cosine ~0.94 on photographs, see FIELD_NOTES A).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if cfg.do_resize:
        nh, nw = cfg.resized_hw(h, w)
        if (nh, nw) != (h, w):
            mode = _TORCH_MODES[cfg.interpolation]
            if cfg.resize_backend == "torchvision":
                # what tvF.resize does on float images (antialias=True, as transformers asks)
                smooth = mode != "nearest-exact"
                x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False if smooth else None,
                                  antialias=smooth)
            else:
                downscale = nh < h or nw < w
                x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=downscale)
    if cfg.do_center_crop:
        x = center_crop(x, cfg.crop_hw, cfg.crop_offset)
    # pixels in [0, 1] are uint8 / 255; the model wants uint8 * rescale_factor (or raw 0..255)
    scale = 255.0 * cfg.rescale_factor if cfg.do_rescale else 255.0
    if scale != 1.0:
        x = x * scale
    return normalize(x, cfg) if cfg.do_normalize else x


# --------------------------------------------------------------------------------------------
# transformers image processor configs
# --------------------------------------------------------------------------------------------

#: image processor classes whose preprocessing :func:`from_hf_image_processor` reproduces; transformers 5
#: loads the torchvision-backed ``CLIPImageProcessor`` for every one of them by default.
HF_CLIP_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                           "CLIPFeatureExtractor")
#: PIL resample codes -> our interpolation names (transformers maps NEAREST to NEAREST_EXACT)
HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_PIL_RESAMPLE_NAMES = {1: "LANCZOS", 4: "BOX", 5: "HAMMING"}


def _hf_size_dict(v, default_to_square: bool, name: str) -> dict:
    """transformers' ``get_size_dict``: int -> square or shortest edge, (h, w) -> height/width."""
    if isinstance(v, bool):
        raise ValueError(f"{name} {v!r} is not a size")
    if isinstance(v, int):
        return {"height": v, "width": v} if default_to_square else {"shortest_edge": v}
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return {"height": int(v[0]), "width": int(v[1])}
    if isinstance(v, dict):
        return {k: int(x) for k, x in v.items() if x is not None}
    raise ValueError(f"{name} {v!r} is not a size (int, [height, width] or a dict)")


def from_hf_image_processor(d: dict, resize_backend: str = "torchvision") -> PreprocessConfig:
    """A transformers ``CLIPImageProcessor`` config dict (``preprocessor_config.json``, or the
    ``image_processor`` entry of ``processor_config.json``) -> the same preprocessing.

    Missing keys take ``CLIPImageProcessor``'s class defaults. Anything we cannot reproduce exactly
    raises ValueError with a one-line reason (never a silent fallback).
    """
    if "AutoImageProcessor" in (d.get("auto_map") or {}):
        raise ValueError("the image processor is custom code (auto_map), not CLIPImageProcessor")
    kind = d.get("image_processor_type") or d.get("feature_extractor_type")
    if kind is not None and kind not in HF_CLIP_PROCESSOR_TYPES:
        raise ValueError(f"image processor {kind!r} is not supported (CLIPImageProcessor only)")
    if d.get("do_pad"):
        raise ValueError("image processor option do_pad is not supported")
    fmt = d.get("data_format")
    if fmt not in (None, "channels_first"):
        raise ValueError(f"image processor data_format {fmt!r} is not supported (channels_first)")
    default_to_square = bool(d.get("default_to_square", False))
    do_resize = bool(d.get("do_resize", True))
    size = _hf_size_dict(d.get("size") if d.get("size") is not None else {"shortest_edge": 224},
                         default_to_square, "size")
    if d.get("use_square_size"):
        # CLIPImageProcessor.__init__ (KOSMOS-2 compatibility) squares the *class default* edge
        size = {"height": 224, "width": 224}
    resize_mode, resize_size = "none", None
    if do_resize:
        if set(size) == {"shortest_edge"}:
            resize_mode, resize_size = "shortest", size["shortest_edge"]
        elif set(size) == {"height", "width"}:
            resize_mode, resize_size = "squash", (size["height"], size["width"])
        else:
            raise ValueError(f"image processor size {size} is not supported (shortest_edge, or height and width)")
    do_crop = bool(d.get("do_center_crop", True))
    crop = _hf_size_dict(d.get("crop_size") if d.get("crop_size") is not None else 224, True, "crop_size")
    if set(crop) != {"height", "width"}:
        raise ValueError(f"image processor crop_size {crop} is not supported (height and width)")
    crop_hw = (crop["height"], crop["width"])
    resample = d.get("resample", 3)
    if resample not in HF_RESAMPLE or isinstance(resample, bool):
        name = _PIL_RESAMPLE_NAMES.get(resample, repr(resample))
        raise ValueError(f"image processor resample {name} is not supported (0 nearest, 2 bilinear, 3 bicubic)")
    if not do_crop and resize_mode != "squash":
        raise ValueError("image processor has neither a centre crop nor a fixed resize: the input size would "
                         "depend on the image")
    rescale_factor = d.get("rescale_factor", 1 / 255)
    if not isinstance(rescale_factor, (int, float)) or isinstance(rescale_factor, bool) or rescale_factor == 0:
        raise ValueError(f"image processor rescale_factor {rescale_factor!r} is not supported")
    mean = d.get("image_mean") if d.get("image_mean") is not None else OPENAI_MEAN
    std = d.get("image_std") if d.get("image_std") is not None else OPENAI_STD
    out_h = crop_hw[0] if do_crop else resize_size[0]
    return PreprocessConfig(
        image_size=out_h, mean=_triple(mean, "image_mean"), std=_triple(std, "image_std"),
        interpolation=HF_RESAMPLE[resample], resize_mode=resize_mode, resize_size=resize_size,
        crop_size=crop_hw, do_center_crop=do_crop, crop_offset="floor", resize_backend=resize_backend,
        do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(rescale_factor),
        do_normalize=bool(d.get("do_normalize", True)), do_convert_rgb=bool(d.get("do_convert_rgb", True)))
