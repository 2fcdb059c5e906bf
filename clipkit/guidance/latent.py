"""Latent-space (Stable Diffusion style) sampling with classifier-free guidance and CLIP guidance.

Components: ``UNet2DConditionModel`` + ``AutoencoderKL`` + transformers ``CLIPTextModel`` + tokenizer + a
diffusers scheduler. The denoiser of the sampling step (:func:`latent_step`, run by
:mod:`clipkit.guidance.sampling`) is the CFG combination ``eps_u + s (eps_c - eps_u)`` of one batched
UNet pass (Ho & Salimans 2022, eq. 6); CLIP guidance wraps it with the same
:func:`~clipkit.guidance.wrapper.guided_step` as pixel models, whose ``decode`` is the VAE decoder: the
objective sees the decoded x0 estimate. Per guided step (FIELD_NOTES B, "Memory"):

1. one UNet pass over [uncond; cond] (with grad only in ``grad_mode='unet'``; its output is reused for
   the scheduler step, no second pass);
2. x0 from the CFG output by ``prediction_type``; one VAE decode of x0 (with grad);
3. the objective over the views in chunks of ``view_chunk`` views, each under activation
   checkpointing, so only one chunk of CLIP activations is alive at a time;
4. one backward pass through the VAE decoder (and the UNet in ``grad_mode='unet'``).

Every network is frozen (``requires_grad_(False)``): no parameter ever gets a ``.grad``.
Unlike diffusers' community ``clip_guided_stable_diffusion``: every scheduler of the wrapper works,
v-prediction is handled, the unconditional batch matches the prompt batch, and CLIP runs in its own
dtype whatever the pipeline's.

There is no generate function here: :class:`LatentDiffusion` (loaded by :func:`load_latent`, registered
for ``StableDiffusionPipeline`` in :mod:`clipkit.guidance.diffusion`) is the latent backend of the one
generate path, :func:`clipkit.guidance.pipeline.generate` (``clipkit generate --diffusion <SD pipeline>``);
``cfg_scale``, ``clip_scale`` and ``negative`` (whose texts not made from ``{prompt}`` are the CFG negative
prompt) are fields of its one config, :class:`~clipkit.guidance.config.GenerateConfig`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.guidance.sampling import Step, denoise_step, iter_sample
from clipkit.guidance.schedulers import count_timesteps, make_scheduler
from clipkit.guidance.wrapper import GuidanceConfig, GuidanceStats, guided_step

log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_CFG_SCALE = 7.5     # Stable Diffusion's own default, used when no cfg_scale is given


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------

@dataclass
class LatentComponents:
    """The pieces of a Stable Diffusion pipeline; all networks are put in eval mode and frozen."""
    unet: torch.nn.Module            # UNet2DConditionModel
    vae: torch.nn.Module             # AutoencoderKL
    text_encoder: torch.nn.Module    # transformers CLIPTextModel
    tokenizer: object                # CLIP tokenizer
    scheduler: object                # DDPM family (clipkit.guidance.schedulers.SCHEDULERS)
    spec: str = "(in memory)"

    def __post_init__(self):
        for m in (self.unet, self.vae, self.text_encoder):
            m.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", None) or 0.18215)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def to(self, device=None, dtype: torch.dtype | None = None) -> "LatentComponents":
        for m in (self.unet, self.vae, self.text_encoder):
            kw = {} if device is None else {"device": device}
            if dtype is not None and next(m.parameters()).dtype != dtype:   # diffusers warns on any dtype cast
                kw["dtype"] = dtype
            if kw:
                m.to(**kw)
        return self

    def with_scheduler(self, name: str) -> "LatentComponents":
        """The same networks with a scheduler of another kind (same noise schedule and prediction type)."""
        return LatentComponents(self.unet, self.vae, self.text_encoder, self.tokenizer,
                                make_scheduler(name, self.scheduler.config, latent=True), self.spec)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (scaled, as the UNet sees them) -> images [B,3,H,W] in about [-1, 1], fp32."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(vae_dtype)).sample.float()


def load_latent_pipeline(spec: str, device="cpu", dtype: torch.dtype = torch.float32,
                         scheduler: str | None = None) -> LatentComponents:
    """Load a Stable Diffusion pipeline from a local diffusers directory or ``hf:ORG/NAME``.

    Raises :class:`ModelLoadError` (one line, with the fix) for bad paths, non-SD directories and hub
    models that are neither cached nor downloadable; never hangs on the network.
    """
    from clipkit.core.registry import parse_spec
    s = parse_spec(spec, "diffusion")
    if s.source.bundled:
        raise ModelLoadError(spec, "the bundled Shapes diffusion model is a pixel model, not a latent one",
                             "use clipkit.guidance.pipeline for it, or give a Stable Diffusion directory / hf:ORG/NAME")
    r = s.resolve()             # a directory or a hub repo id; hub checks done (fails fast offline)
    comps = load_components(r.location, spec, r.local_only, device, dtype)
    return comps.with_scheduler(scheduler) if scheduler else comps


def load_components(source: str, spec: str, local_only: bool, device="cpu",
                    dtype: torch.dtype = torch.float32) -> LatentComponents:
    """The components of a Stable Diffusion pipeline in ``source`` (a directory or a hub repo id),
    with its own scheduler; failures are one-line :class:`ModelLoadError` naming ``spec``."""
    from clipkit.core import hub
    is_dir = Path(source).is_dir()
    if is_dir:
        missing = [f for f in SUBFOLDERS if not (Path(source) / f).is_dir()]
        if missing:
            raise ModelLoadError(spec, f"not a Stable Diffusion pipeline directory (missing {', '.join(missing)}/)",
                                 "save one with StableDiffusionPipeline.save_pretrained")
    hub.short_timeouts()
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    kw = {"local_files_only": local_only}
    nets = {**kw, "torch_dtype": dtype}     # cast while loading (the name both libraries' supported versions take)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **nets)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **nets)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **nets)
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        sched_cfg = diffusers.DDIMScheduler.load_config(source, subfolder="scheduler", **kw)
        sched_cls = getattr(diffusers, sched_cfg.get("_class_name", ""), None)
        if sched_cls is None:
            raise ValueError(f"unknown scheduler class {sched_cfg.get('_class_name')!r}")
        sched = sched_cls.from_config(sched_cfg)
    except Exception as e:
        fix = "check the directory's components" if is_dir else hub.OFFLINE_FIX
        raise ModelLoadError(spec, hub.one_line(e), fix) from e
    return LatentComponents(unet, vae, text_encoder, tokenizer, sched, spec).to(device, dtype)


# --------------------------------------------------------------------------------------------
# Text conditioning and classifier-free guidance
# --------------------------------------------------------------------------------------------

def encode_prompts(components: LatentComponents, texts: Sequence[str]) -> torch.Tensor:
    """Strings -> text-encoder hidden states [N, L, C] (padded to the encoder's length; truncation warns)."""
    tok, enc = components.tokenizer, components.text_encoder
    max_len = min(int(getattr(tok, "model_max_length", 77) or 77), int(enc.config.max_position_embeddings))
    ids = tok(list(texts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    full = tok(list(texts), padding=False, truncation=False).input_ids
    for text, f in zip(texts, full):
        if len(f) > max_len:
            log.warning("prompt truncated to %d tokens: %r", max_len, text[:60])
    with torch.no_grad():
        return enc(ids.to(components.device)).last_hidden_state


def make_cfg_model(unet, cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> Callable:
    """``model(x, t)`` for the sampler: one UNet pass over [uncond; cond] combined as
    ``u + cfg_scale * (c - u)`` (linear, so valid for eps, v and x0 outputs); ``uncond=None``: cond only.

    ``cond``/``uncond``: [B, L, C] for a latent batch of B. The output is fp32.
    """
    if uncond is not None and uncond.shape != cond.shape:
        raise InputError(f"unconditional batch {tuple(uncond.shape)} does not match the prompt batch "
                         f"{tuple(cond.shape)}")
    dtype = next(unet.parameters()).dtype
    ctx = cond if uncond is None else torch.cat([uncond, cond])

    def model(x: torch.Tensor, t) -> torch.Tensor:
        if x.shape[0] != cond.shape[0]:
            raise InputError(f"latent batch {x.shape[0]} does not match the prompt batch {cond.shape[0]}")
        xin = x if uncond is None else torch.cat([x, x])
        out = unet(xin.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample.float()
        if uncond is None:
            return out
        u, c = out.chunk(2)
        return u + cfg_scale * (c - u)
    return model


# --------------------------------------------------------------------------------------------
# The latent step
# --------------------------------------------------------------------------------------------

def _size_unit(comps: LatentComponents) -> int:
    """Image sides must be multiples of this (VAE downsampling x UNet downsampling)."""
    return comps.vae_scale_factor * 2 ** (len(comps.unet.config.block_out_channels) - 1)


def latent_step(components: LatentComponents, texts: Sequence[str], negatives: Sequence[str] | None,
                cfg_scale: float, generator: torch.Generator, objective: Callable | None = None,
                guidance: GuidanceConfig | None = None, view_batch: int = 0,
                on_stats: Callable[[GuidanceStats], None] | None = None) -> Step:
    """The sampling step of a latent batch with one text per latent: the CFG denoiser over the text
    encoder (:func:`make_cfg_model`, a denoiser wrapper of its own; ``negatives``: the unconditional
    texts, None: ""), wrapped by CLIP guidance (:func:`~clipkit.guidance.wrapper.guided_step`, on the
    VAE-decoded x0 estimate) when ``guidance`` (scale > 0) and ``objective`` are given.

    ``generator`` draws a stochastic scheduler's noise; a guided step first draws the seed of its
    views from it. ``view_batch``: CLIP views per forward (0: the guidance config's ``view_chunk``);
    ``on_stats`` receives the guidance statistics of every guided step.
    """
    texts = list(texts)
    cond = encode_prompts(components, texts)                                  # [B,L,C]
    uncond = None
    if cfg_scale != 1:
        negs = [""] * len(texts) if negatives is None else list(negatives)
        uncond = encode_prompts(components, negs)
    model = make_cfg_model(components.unet, cond, uncond, cfg_scale)
    sched = components.scheduler
    if guidance is None or objective is None or guidance.scale <= 0:
        return denoise_step(model, sched, generator)
    if view_batch:
        guidance = dataclasses.replace(guidance, view_chunk=view_batch)
    view_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=generator,
                                                                 device=generator.device)))
    return guided_step(model, sched, objective, guidance, decode=lambda z: (components.decode(z) + 1) / 2,
                       generator=view_gen, noise_generator=generator, on_stats=on_stats)


def encode_init(components: LatentComponents, init: torch.Tensor) -> torch.Tensor:
    """img2img: images [B, 3, H, W] in [0, 1] -> scaled latents (the VAE posterior mean), fp32."""
    with torch.no_grad():
        vae_dtype = next(components.vae.parameters()).dtype
        post = components.vae.encode((init * 2 - 1).to(components.device, vae_dtype)).latent_dist
        return (post.mean.float() - components.shift_factor) * components.scaling_factor


# --------------------------------------------------------------------------------------------
# Backend of clipkit.guidance.pipeline.generate (`clipkit generate --diffusion <SD pipeline>`)
# --------------------------------------------------------------------------------------------

class LatentDiffusion:
    """A Stable Diffusion pipeline as a :class:`~clipkit.guidance.backends.DiffusionBackend`:
    classifier-free guidance (``cfg_scale``) plus CLIP guidance on the decoded x0 estimate.

    Every image is sampled alone (a batch of one, every random draw from a generator seeded with its
    seed), so its seed alone fixes it. ``clip_scale`` in step_mode "normalized" is the RMS each guided
    step moves the *latent* x0 estimate (scaled latents, about unit variance, like pixels in [-1, 1]).
    """
    kind = "latent"
    conditional = True
    guide_targets = ("x0",)

    def __init__(self, components: LatentComponents, spec: str | None = None, view_batch: int = 0,
                 on_stats: Callable[[GuidanceStats], None] | None = None):
        self.components = components
        self.spec = spec or components.spec
        self.native_size = components.default_size
        self.view_batch = view_batch        # CLIP views per forward (0: the guidance config's view_chunk)
        self.on_stats = on_stats            # receives every guided step's GuidanceStats (monitoring, tests)

    @staticmethod
    def cfg_scale(config) -> float:
        return DEFAULT_CFG_SCALE if config.cfg_scale is None else float(config.cfg_scale)

    def check(self, config):
        """InputError for sizes and step counts this model cannot take; the config with cfg_scale filled in."""
        if getattr(config, "guide_target", "x0") != "x0":
            raise InputError("--guide-target xt needs a pixel-space model (a noise-aware CLIP sees x_t); "
                             "latent models guide on the decoded x0 estimate")
        size = config.size or self.native_size
        unit = _size_unit(self.components)
        if size % unit:
            raise InputError(f"size must be a multiple of {unit} for {self.spec!r}, got {size}")
        self.steps_per_image(config)
        return dataclasses.replace(config, cfg_scale=self.cfg_scale(config))

    def steps_per_image(self, config) -> int:
        return count_timesteps(config.scheduler, self.components.scheduler.config, config.steps, self.spec,
                               latent=True)

    def trajectory(self, cond, seed: int, config):
        """One image's sampling as :func:`~clipkit.guidance.sampling.iter_sample` states (latents): the
        initial noise is the first draw of a generator seeded with ``seed`` (as diffusers' pipelines draw
        it), the same generator then draws the guidance views' seed and a stochastic scheduler's noise."""
        size = config.size or self.native_size
        guidance = config.guidance() if config.guided and cond.objective is not None else None
        comps = self.components.with_scheduler(config.scheduler)         # fresh scheduler state per image
        generator = torch.Generator().manual_seed(int(seed))
        shape = (1, int(comps.unet.config.in_channels), size // comps.vae_scale_factor, size // comps.vae_scale_factor)
        noise = torch.randn(shape, generator=generator, device=generator.device)      # before any other draw
        negs = None if cond.negative is None else [cond.negative]
        step = latent_step(comps, [cond.text], negs, self.cfg_scale(config), generator, cond.objective, guidance,
                           self.view_batch, self.on_stats)
        z_init = None if cond.init is None else encode_init(comps, cond.init)
        return iter_sample(step, comps.scheduler, shape, config.steps, generator, device=comps.device,
                           noise=noise, init=z_init, strength=cond.strength)

    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels [B, 3, H, W] in [0, 1] (VAE decode), fp32 on the CPU."""
        with torch.no_grad():
            return ((self.components.decode(z) + 1) / 2).clamp(0, 1).float().cpu()


def load_latent(source: str, spec: str, local_only: bool, device="cpu",
                dtype: torch.dtype = torch.float32) -> LatentDiffusion:
    """The registry's loader for ``StableDiffusionPipeline`` (:mod:`clipkit.guidance.diffusion`)."""
    return LatentDiffusion(load_components(source, spec, local_only, device, dtype), spec)
