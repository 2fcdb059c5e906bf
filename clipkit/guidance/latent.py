"""Latent-space (Stable Diffusion style) sampling with classifier-free guidance and CLIP guidance.

Components: ``UNet2DConditionModel`` + ``AutoencoderKL`` + transformers ``CLIPTextModel`` + tokenizer + a
diffusers scheduler. The denoiser handed to :func:`clipkit.guidance.wrapper.sample` is the CFG
combination ``eps_u + s (eps_c - eps_u)`` of one batched UNet pass (Ho & Salimans 2022, eq. 6); CLIP
guidance wraps it with the same :func:`~clipkit.guidance.wrapper.guided_step` as pixel models,
whose ``decode`` is the VAE decoder: the objective sees the decoded x0 estimate. Per guided step
(FIELD_NOTES B, "Memory"):

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

:class:`LatentDiffusion` (loaded by :func:`load_latent`, registered for ``StableDiffusionPipeline`` in
:mod:`clipkit.guidance.diffusion`) is the backend of ``clipkit generate --diffusion <SD pipeline>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.guidance.schedulers import count_timesteps, make_scheduler
from clipkit.core.objectives import ClipTarget
from clipkit.guidance.backends import tensor_to_pil
from clipkit.guidance.sampling import denoise_step, iter_sample, sample
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
# Generation
# --------------------------------------------------------------------------------------------

@dataclass
class LatentGenerateConfig:
    """Every parameter of one :func:`generate_latent` call (saved beside the images)."""
    spec: str
    prompts: list[str]
    negative_prompts: list[str] | None
    n_per_prompt: int
    steps: int
    cfg_scale: float
    height: int
    width: int
    seed: int | None
    scheduler: str                      # class name
    prediction_type: str
    precision: str
    view_batch: int
    clip_spec: str | None
    guidance: dict | None = None        # GuidanceConfig.to_dict(), None = no CLIP guidance

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LatentResult:
    images: list[Image.Image]           # N = len(prompts) * n_per_prompt, prompt-major
    prompts: list[str]                  # the prompt of each image
    latents: torch.Tensor               # [N, C, h, w] final latents (fp32, CPU)
    pixels: torch.Tensor                # [N, 3, H, W] decoded images in [0, 1] (fp32, CPU)
    clip_scores: torch.Tensor | None    # [N] raw cosine of each saved image with its prompt (scorer's PIL path)
    config: LatentGenerateConfig
    history: list[GuidanceStats] = field(default_factory=list)

    def to_json(self) -> str:
        scores = None if self.clip_scores is None else [float(s) for s in self.clip_scores]
        return json.dumps({"config": self.config.to_dict(), "prompts": self.prompts, "clip_scores": scores})


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _as_list(x, name: str, n: int | None = None) -> list[str]:
    items = [x] if isinstance(x, str) else list(x)
    if not items or not all(isinstance(p, str) for p in items):
        raise InputError(f"{name} must be a non-empty string or list of strings")
    if n is not None and len(items) == 1:
        items = items * n
    if n is not None and len(items) != n:
        raise InputError(f"{name}: got {len(items)}, expected 1 or one per prompt ({n})")
    return items


def _size_unit(comps: LatentComponents) -> int:
    """Image sides must be multiples of this (VAE downsampling x UNet downsampling)."""
    return comps.vae_scale_factor * 2 ** (len(comps.unet.config.block_out_channels) - 1)


def _check_size(comps: LatentComponents, height: int | None, width: int | None) -> tuple[int, int]:
    h = height or comps.default_size
    w = width or comps.default_size
    unit = _size_unit(comps)
    if h <= 0 or w <= 0 or h % unit or w % unit:
        raise InputError(f"height and width must be positive multiples of {unit} for this model, got {h}x{w}")
    return h, w


def _sampler(components: LatentComponents, prompts: list[str], negs: list[str] | None, n_per_prompt: int,
             cfg_scale: float, guidance: GuidanceConfig | None, scorer, objective: Callable | None, view_batch: int,
             generator: torch.Generator, init: torch.Tensor | None, h: int, w: int, on_stats=None):
    """(step, init latents or None) for a latent batch of ``len(prompts) * n_per_prompt``: the step of the
    CFG denoiser over the text encoder (a denoiser wrapper of its own), or its guided step when asked;
    ``on_stats`` receives the guidance statistics."""
    sched, dev = components.scheduler, components.device
    N = len(prompts) * n_per_prompt
    per_image = [p for p in prompts for _ in range(n_per_prompt)]             # prompt-major
    # text conditioning: encode each distinct text once, expand to the latent batch (B = N)
    cond = encode_prompts(components, prompts).repeat_interleave(n_per_prompt, dim=0)        # [N,L,C]
    uncond = None
    if cfg_scale != 1:
        uncond = encode_prompts(components, negs or [""] * len(prompts)).repeat_interleave(n_per_prompt, dim=0)
    model = make_cfg_model(components.unet, cond, uncond, cfg_scale)

    # CLIP guidance wraps the CFG denoiser
    step = denoise_step(model, sched, generator)
    if guidance is not None and guidance.scale > 0:
        if objective is None:
            objective = ClipTarget(scorer, scorer.text_embeddings(per_image)[:, None, :])   # [N,1,D]
        if view_batch:
            guidance = dataclasses.replace(guidance, view_chunk=view_batch)
        view_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=generator,
                                                                     device=generator.device)))
        step = guided_step(model, sched, objective, guidance, decode=lambda z: (components.decode(z) + 1) / 2,
                           generator=view_gen, noise_generator=generator, on_stats=on_stats)
    z_init = None
    if init is not None:
        if tuple(init.shape) != (N, 3, h, w):
            raise InputError(f"init images have shape {tuple(init.shape)}, expected {(N, 3, h, w)}")
        with torch.no_grad():
            vae_dtype = next(components.vae.parameters()).dtype
            post = components.vae.encode((init * 2 - 1).to(dev, vae_dtype)).latent_dist
            z_init = (post.mean.float() - components.shift_factor) * components.scaling_factor

    return step, z_init


def generate_latent(components: LatentComponents, prompts: str | Sequence[str], n_per_prompt: int = 1,
                    steps: int = 25, cfg_scale: float = DEFAULT_CFG_SCALE, guidance: GuidanceConfig | None = None,
                    scorer=None, negative_prompt: str | Sequence[str] | None = None, seed: int | None = 0,
                    generator: torch.Generator | None = None, height: int | None = None,
                    width: int | None = None, noise: torch.Tensor | None = None, precision: str = "fp32",
                    view_batch: int = 0, callback: Callable | None = None, score: bool = True,
                    objective: Callable | None = None, init: torch.Tensor | None = None,
                    strength: float = 1.0) -> LatentResult:
    """Sample ``n_per_prompt`` images per prompt with classifier-free guidance and (optionally) CLIP guidance.

    Args:
        components: the pipeline (see :func:`load_latent_pipeline`); its scheduler is used as given.
        cfg_scale: classifier-free guidance scale; 1 = the conditional model alone (one UNet pass per step).
        guidance: CLIP guidance settings (needs ``scorer``); None = CFG only.
        scorer: a :class:`~clipkit.core.scorer.ClipScorer`; guides (if ``guidance``) and scores the results
            (unless ``score=False``: then ``clip_scores`` is None).
        negative_prompt: the unconditional text(s): one for all, or one per prompt (default "").
        seed / generator: the only randomness (initial noise, ancestral noise, guidance views);
            a generator wins over the seed. The initial noise is drawn first, so a seed gives the same
            starting noise with and without CLIP guidance.
        noise: initial latent noise [N, C, h, w] (unit variance) instead of drawing it.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast around the networks (scores stay fp32).
        view_batch: CLIP views per forward (0: the guidance config's ``view_chunk``).
        objective: what CLIP guidance optimises (:mod:`clipkit.core.objectives`, pixels in [0, 1] ->
            loss); default: the scorer's text target, one prompt per image.
        init / strength: img2img: images [N, 3, H, W] in [0, 1], VAE-encoded (the posterior mean) and
            noised to ``strength`` of the trajectory (:func:`~clipkit.guidance.wrapper.sample`).
    """
    # 1. validate
    prompts = _as_list(prompts, "prompts")
    negs = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt", len(prompts))
    if not isinstance(n_per_prompt, int) or n_per_prompt < 1:
        raise InputError(f"n_per_prompt must be an integer >= 1, got {n_per_prompt!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise InputError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if precision not in _AUTOCAST:
        raise InputError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    if guidance is not None:
        guidance.validate()
        if scorer is None and objective is None:
            raise InputError("CLIP guidance needs a scorer (or an objective)")
    h, w = _check_size(components, height, width)
    sched, dev = components.scheduler, components.device
    own_generator = generator is not None
    if generator is None:
        if seed is None:
            raise InputError("give a seed or a torch.Generator")
        generator = torch.Generator().manual_seed(int(seed))
    N = len(prompts) * n_per_prompt
    shape = (N, int(components.unet.config.in_channels), h // components.vae_scale_factor,
             w // components.vae_scale_factor)
    per_image = [p for p in prompts for _ in range(n_per_prompt)]             # prompt-major
    if noise is None:                                                         # before any other draw
        noise = torch.randn(shape, generator=generator, device=generator.device)

    history: list[GuidanceStats] = []
    step, z_init = _sampler(components, prompts, negs, n_per_prompt, cfg_scale, guidance, scorer, objective,
                            view_batch, generator, init, h, w, on_stats=history.append)

    # 4. sample in latent space, decode once
    amp = _AUTOCAST[precision]
    ac = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ac:
        z = sample(step, sched, shape, steps, generator, device=dev, callback=callback, noise=noise,
                   init=z_init, strength=strength)
        with torch.no_grad():
            pix = ((components.decode(z) + 1) / 2).clamp(0, 1).float().cpu()
    images = [tensor_to_pil(p) for p in pix]

    # 5. final scores: the saved (8-bit) images through the scorer's PIL path, fp32
    scores = None
    if scorer is not None and score:
        emb = scorer.encode_images(images)
        scores = (emb * scorer.text_embeddings(per_image).to(emb.device)).sum(-1).float().cpu()
    config = LatentGenerateConfig(
        spec=components.spec, prompts=prompts, negative_prompts=negs, n_per_prompt=n_per_prompt, steps=steps,
        cfg_scale=float(cfg_scale), height=h, width=w, seed=None if own_generator else seed,
        scheduler=type(sched).__name__, prediction_type=sched.config.get("prediction_type", "epsilon"),
        precision=precision, view_batch=view_batch, clip_spec=getattr(scorer, "spec", None),
        guidance=guidance.to_dict() if guidance is not None else None)
    return LatentResult(images, per_image, z.float().cpu(), pix, scores, config, history)


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

    def __init__(self, components: LatentComponents, spec: str | None = None, view_batch: int = 0):
        self.components = components
        self.spec = spec or components.spec
        self.native_size = components.default_size
        self.view_batch = view_batch

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
        """One image's sampling as :func:`~clipkit.guidance.wrapper.iter_sample` states (latents); the
        same draws as :func:`generate_latent` with ``seed`` and a batch of one."""
        size = config.size or self.native_size
        guidance = config.guidance() if config.guided and cond.objective is not None else None
        comps = self.components.with_scheduler(config.scheduler)         # fresh scheduler state per image
        generator = torch.Generator().manual_seed(int(seed))
        shape = (1, int(comps.unet.config.in_channels), size // comps.vae_scale_factor, size // comps.vae_scale_factor)
        noise = torch.randn(shape, generator=generator, device=generator.device)      # before any other draw
        negs = None if cond.negative is None else [cond.negative]
        step, z_init = _sampler(comps, [cond.text], negs, 1, self.cfg_scale(config), guidance, None, cond.objective,
                                self.view_batch, generator, cond.init, size, size)
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
