"""What a CLIP that guides diffusion is trained on besides clean images (DESIGN §4): augmentations that
look like x0 estimates (noise, blur, low resolution upsampled, tinted backgrounds), applied on the
device per sample, and GLIDE-style noising to x_t with the diffusion model's own schedule
(``DDPMScheduler.alphas_cumprod`` of its ``scheduler/`` config), for noise-aware training."""
from __future__ import annotations

import inspect
import json

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from clipkit.core.errors import ModelLoadError
from clipkit.core.hub import one_line
from clipkit.core.registry import parse_spec


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, sigma [B] in pixels (kernel 7)."""
    k = torch.arange(7, device=x.device, dtype=x.dtype) - 3
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    w = w / w.sum(dim=1, keepdim=True)                                   # [B, 7]
    B, C, H, W = x.shape
    xp = F.pad(x, (3, 3, 3, 3), mode="replicate")
    # separable: rows then columns, grouped per sample
    xr = F.conv2d(xp.reshape(1, B * C, H + 6, W + 6), w.repeat_interleave(C, 0)[:, None, None, :],
                  groups=B * C)
    xc = F.conv2d(xr, w.repeat_interleave(C, 0)[:, None, :, None], groups=B * C)
    return xc.view(B, C, H, W)


def augment_robust(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make clean renders look like guidance's x0 estimates: low-res, blur, noise, tint, contrast."""
    B, _, H, W = x.shape
    dev = x.device

    def pick(p):
        return (torch.rand(B, device=dev, generator=gen) < p).view(B, 1, 1, 1)

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(B, *shape, device=dev, generator=gen)

    lo = max(8, H // 4)
    small = int(torch.randint(lo, H, (1,), generator=gen, device=dev)) if H > lo else H
    lowres = F.interpolate(F.interpolate(x, size=(small, small), mode="area"), size=(H, W),
                           mode="bilinear", align_corners=False)
    x = torch.where(pick(0.3), lowres, x)
    x = torch.where(pick(0.3), gaussian_blur(x, u(0.3, 1.5)), x)
    x = torch.where(pick(0.25), x * u(0.6, 1.0, 1, 1, 1), x)                       # contrast
    x = torch.where(pick(0.25), x + u(0.0, 0.2, 3, 1, 1) * (1 - x), x)             # tinted background
    noise = torch.randn(x.shape, device=dev, generator=gen) * u(0.0, 0.25, 1, 1, 1)
    x = torch.where(pick(0.4), x + noise, x)
    return x.clamp(0, 1)


def ddpm_alphas_cumprod(spec: str = "shapes") -> torch.Tensor:
    """abar_t of a diffusion model's forward process, from its own scheduler: ``DDPMScheduler.from_config``
    of the model's ``scheduler/scheduler_config.json`` (num_train_timesteps, betas, beta_schedule,
    zero-SNR rescaling), so x_t is noised as that model was trained and as guidance on x_t feeds the
    CLIP. ``spec``: a diffusion model spec (``shapes``, the bundled DDPM: linear, 1000 steps; a diffusers
    pipeline directory; ``hf:ORG/NAME``); a ModelLoadError when it has no usable scheduler config."""
    r = parse_spec(spec, "diffusion").resolve()
    try:
        config = json.loads(r.file("scheduler/scheduler_config.json").read_text(encoding="utf-8"))
        params = inspect.signature(DDPMScheduler.__init__).parameters    # the schedule's keys, of any scheduler
        sched = DDPMScheduler.from_config({k: v for k, v in config.items() if k in params})
    except Exception as e:
        raise ModelLoadError(r.raw, f"no usable scheduler config for the noise schedule ({one_line(e)})",
                             r.fix("check its scheduler/scheduler_config.json")) from e
    return sched.alphas_cumprod.float().clone()


def noise_images(x: torch.Tensor, gen: torch.Generator, fraction: float, alphas_cumprod: torch.Tensor):
    """Replace ``fraction`` of the batch by x_t = sqrt(ab) x + sqrt(1-ab) eps (in [-1, 1] space)."""
    B = x.shape[0]
    ab = alphas_cumprod.to(x.device)[torch.randint(0, len(alphas_cumprod), (B,), device=x.device,
                                                   generator=gen)].view(B, 1, 1, 1)
    eps = torch.randn(x.shape, device=x.device, generator=gen)
    xt = (ab.sqrt() * (2 * x - 1) + (1 - ab).sqrt() * eps + 1) / 2
    keep = (torch.rand(B, device=x.device, generator=gen) >= fraction).view(B, 1, 1, 1)
    return torch.where(keep, x, xt)
