"""Diffusion backends: what `generate` needs from a diffusion model (:class:`DiffusionBackend`), and the
pixel-space one (a diffusers ``UNet2DModel`` + its scheduler config: ``DDPMPipeline``/``DDIMPipeline``
directories and repos, e.g. the bundled Shapes model or ``google/ddpm-cifar10-32``). The latent one
(``StableDiffusionPipeline``: classifier-free + CLIP guidance) is :class:`clipkit.guidance.latent.LatentDiffusion`;
both are registered with the model registry by :mod:`clipkit.guidance.diffusion`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.guidance.config import MAX_SEED, GenerateConfig
from clipkit.guidance.sampling import denoise_step, iter_sample
from clipkit.guidance.schedulers import count_timesteps, make_scheduler
from clipkit.guidance.wrapper import guided_step


@runtime_checkable
class DiffusionBackend(Protocol):
    """What :func:`generate` needs from a diffusion model."""
    spec: str            # the model spec it was loaded from
    kind: str            # "pixel" | "latent"
    conditional: bool    # takes text itself (then cfg_scale applies)
    native_size: int     # default image side in pixels
    guide_targets: tuple  # what its CLIP guidance can show the CLIP: ("x0", "xt") or ("x0",)

    def check(self, config: GenerateConfig) -> GenerateConfig:
        """Raise InputError for parameters this model cannot take (before anything is generated);
        return the config with this model's defaults filled in (what is used and recorded)."""

    def steps_per_image(self, config: GenerateConfig) -> int:
        """How many times ``generate`` calls ``on_step`` per image (for progress bars)."""

    def trajectory(self, cond: "Conditioning", seed: int, config: GenerateConfig) -> Iterator:
        """One image's sampling, step by step: :class:`~clipkit.guidance.wrapper.SampleState` after every
        step (``x`` and ``x0`` in the model's space); it must depend only on (cond, seed, config).
        A backend may also offer ``trajectories(cond, seeds, config)``: the seeds as one batch (a
        :class:`Rows`), which :func:`~clipkit.guidance.pipeline.generate` then uses (the pixel backend)."""

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels [B, 3, H, W] in [0, 1] on the CPU (the final ``x``, or an ``x0``)."""


@dataclass
class Conditioning:
    """What one prompt asks of a backend: the objective guidance optimises and, for text-conditioned
    models, the texts of classifier-free guidance; optionally an image to start from."""
    objective: Callable | None      # pixels in [0, 1] -> loss [B] (None: unguided)
    text: str = ""                  # what a text-conditioned model is conditioned on
    negative: str | None = None     # its CFG negative prompt (None: "")
    init: torch.Tensor | None = None    # [1, 3, H, W] pixels in [0, 1] at the output size (img2img)
    strength: float = 1.0           # with init: the part of the trajectory that is run


class Rows:
    """A batch of trajectories (:meth:`PixelDiffusion.trajectories`): iterate for its states;
    :meth:`keep` goes on with some rows only (drafts), dropping the other rows' generators too."""

    def __init__(self, states, per_row: Sequence[list]):
        self.states, self.per_row = states, per_row

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.states)

    def keep(self, rows: Sequence[int]):
        """Go on with ``rows`` (indices into the current batch); returns the next state."""
        rows = list(rows)
        for lst in self.per_row:
            lst[:] = [lst[r] for r in rows]
        return self.states.send(rows)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> 8-bit RGB PIL image (rounded, as diffusers does)."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


class PixelDiffusion:
    """An unconditional pixel-space ``UNet2DModel`` + its scheduler config, guided by CLIP."""
    kind = "pixel"
    conditional = False
    guide_targets = ("x0", "xt")

    def __init__(self, unet, scheduler_config: dict, spec: str, device="cpu", dtype=torch.float32):
        unet = unet.to(device) if unet.dtype == dtype else unet.to(device, dtype)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        size = unet.config.sample_size
        self.native_size = int(size if isinstance(size, int) else size[0])
        self.channels = int(unet.config.in_channels)
        self._multiple = 2 ** (len(unet.config.block_out_channels) - 1)

    def _model(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t).sample.float()

    def check(self, config: GenerateConfig) -> GenerateConfig:
        if config.cfg_scale not in (None, 0):
            raise InputError(f"--cfg-scale applies to text-conditioned (latent) models only; {self.spec!r} is an "
                             "unconditional pixel model steered by CLIP guidance alone: drop --cfg-scale "
                             "(use --clip-scale)")
        size = config.size or self.native_size
        if size % self._multiple:
            raise InputError(f"size must be a multiple of {self._multiple} for {self.spec!r}, got {size}")
        if self.channels != 3:
            raise InputError(f"{self.spec!r} has {self.channels} channels; CLIP guidance needs RGB (3)")
        self.steps_per_image(config)
        return config

    def steps_per_image(self, config: GenerateConfig) -> int:
        return count_timesteps(config.scheduler, self.scheduler_config, config.steps, self.spec)

    def trajectory(self, cond: Conditioning, seed: int, config: GenerateConfig):
        """One image's sampling as :func:`~clipkit.guidance.sampling.iter_sample` states (model space)."""
        return self.trajectories(cond, [seed], config)

    def trajectories(self, cond: Conditioning, seeds: Sequence[int], config: GenerateConfig) -> "Rows":
        """The images of ``seeds`` sampled together, one batch through the network and the CLIP: states
        with ``x`` [len(seeds), ...]. Each row draws from its own seeded generators (its initial noise,
        its guidance views, a stochastic scheduler's noise), as it would alone, so a seed's image
        does not depend on the others in its batch beyond float rounding (a batched convolution sums
        in another order than one of batch 1: ~1e-6)."""
        size = config.size or self.native_size
        B = len(seeds)
        init = None if cond.init is None else (cond.init.to(self.device) * 2 - 1).expand(B, -1, -1, -1)  # model space
        sched = make_scheduler(config.scheduler, self.scheduler_config)
        noise = [torch.Generator().manual_seed(int(s)) for s in seeds]      # CPU: same noise on any device
        x = torch.cat([torch.randn((1, self.channels, size, size), generator=g) for g in noise])
        views = [torch.Generator().manual_seed(int(s) + MAX_SEED) for s in seeds]
        if config.guided and cond.objective is not None:
            step = guided_step(self._model, sched, cond.objective, config.guidance(),
                               generator=views if B > 1 else views[0], noise_generator=noise if B > 1 else noise[0])
        else:
            step = denoise_step(self._model, sched, noise if B > 1 else noise[0])
        states = iter_sample(step, sched, (B, self.channels, size, size), config.steps, noise[0], device=self.device,
                             noise=x, init=init, strength=cond.strength)
        return Rows(states, [noise, views])

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space [-1, 1] -> pixels [B, 3, H, W] in [0, 1], on the CPU."""
        return ((x.detach().float() + 1) / 2).clamp(0, 1).cpu()


def load_pixel(source: str, spec: str, local_only: bool, device="cpu", dtype=torch.float32) -> PixelDiffusion:
    """A diffusers DDPM/DDIM pipeline (``unet/`` + ``scheduler/``) from a directory or a hub repo."""
    where = {"pretrained_model_name_or_path": str(Path(source) / "unet")} if Path(source).is_dir() else \
        {"pretrained_model_name_or_path": source, "subfolder": "unet", "local_files_only": local_only}
    unet = UNet2DModel.from_pretrained(**where, dtype=torch.float32)
    where = {"pretrained_model_name_or_path": str(Path(source) / "scheduler")} if Path(source).is_dir() else \
        {"pretrained_model_name_or_path": source, "subfolder": "scheduler", "local_files_only": local_only}
    sched_cfg = DDPMScheduler.load_config(**where)
    return PixelDiffusion(unet, sched_cfg, spec, device=device, dtype=dtype)
