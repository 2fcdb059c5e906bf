"""DDPM training of an unconditional pixel model (``clipkit train diffusion``; the bundled Shapes model's
recipe is :mod:`clipkit.shapes.recipes`).

A diffusers ``UNet2DModel`` (32x32 for Shapes) learns eps-prediction (Ho et al. 2020, Alg. 1) on the
images of a recipe (Shapes renders drawn on the device) through core's training loop; an EMA
(diffusers' ``EMAModel``) of the weights is what gets exported, as a diffusers ``DDPMPipeline``
directory (``model_index.json`` + ``unet/`` + ``scheduler/``, safetensors), so the same loader reads it
and any ``google/ddpm-*`` repository. During training, samples are drawn with DDIM, saved as a grid and
judged by the recipe's judge (Shapes: the oracle's valid-object rate and colour/position histograms).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from clipkit.core.errors import InputError
from clipkit.core.hub import one_line
from clipkit.guidance.sampling import denoise_step, sample

log = logging.getLogger(__name__)

SHAPES_UNET_CFG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 16,
}


@dataclass
class TrainDiffusionConfig:
    out_dir: str = "runs/diffusion"
    unet_cfg: dict | None = None          # UNet2DModel config (default: SHAPES_UNET_CFG)
    init: str | None = None               # continue from a diffusers pipeline/UNet directory
    device_data: bool = False             # draw scenes on the device (fast on GPUs) instead of a DataLoader
    steps: int = 30_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.9995
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    p_two: float = 0.35
    eval_every: int = 2000
    eval_samples: int = 256
    eval_steps: int = 50                  # DDIM steps for eval samples
    save_every: int = 2000
    log_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"
    num_workers: int = 0
    export_dtype: str = "fp16"
    resume: bool = False
    time_limit_s: float | None = None    # stop early: total steps re-planned from the measured rate


@dataclass
class DiffusionTrainResult:
    out_dir: str
    model_dir: str
    steps: int
    wall_s: float
    final_eval: dict = field(default_factory=dict)


def sample_ddim(unet, scheduler_config: dict, n: int, steps: int, generator: torch.Generator,
                device, batch_size: int = 256) -> torch.Tensor:
    """Unguided DDIM (eta=0) samples in [0, 1], [n, 3, H, W], by the one sampling loop
    (:func:`clipkit.guidance.sampling.sample`), ``batch_size`` at a time."""
    sched = DDIMScheduler.from_config(scheduler_config)
    size = unet.config.sample_size
    step = denoise_step(lambda x, t: unet(x, t).sample, sched)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        x = sample(step, sched, (b, 3, size, size), steps, generator, device=device)
        out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


@dataclass
class DiffusionData:
    """Training images for :func:`train_diffusion`, from a recipe
    (:func:`clipkit.shapes.recipes.shapes_diffusion_data` for the bundled Shapes model)."""
    batches: Iterable                   # a DataLoader (prepared here) or an endless iterator of batches
    to_images: Callable                 # batch -> x0 [B, 3, H, W] in [0, 1] on the device
    judge: Callable | None = None       # samples [N, 3, H, W] in [0, 1] -> {metric: value}, every evaluation
    eval_columns: tuple = ()            # eval_log.csv columns of the judge's metrics


#: A recipe's data: (config, sample size, the trainer's generator, number of processes) -> DiffusionData.
DiffusionDataFactory = Callable[[TrainDiffusionConfig, int, torch.Generator, int], DiffusionData]


class _EmaState:
    """diffusers' EMAModel as an accelerate checkpoint object; its shadow weights go back to the
    training device after loading (they are loaded on the CPU)."""

    def __init__(self, ema, device):
        self.ema, self.device = ema, device

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)
        self.ema.to(self.device)


def train_diffusion(cfg: TrainDiffusionConfig, progress: bool = True,
                    data: DiffusionDataFactory | None = None) -> DiffusionTrainResult:
    """DDPM training (see the module docstring) on the images of ``data``, a recipe's factory
    (:func:`clipkit.shapes.recipes.shapes_diffusion_data`; ``clipkit train diffusion`` wires it)."""
    from accelerate.utils import set_seed

    from clipkit.core.dist import accelerator
    from clipkit.core.training import LoopSettings, RngStates, StepOutput, export_dtype, train_loop

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError("steps and batch_size must be >= 1")
    if data is None:
        raise InputError("train_diffusion needs training images: pass data= (the Shapes recipe: "
                         "clipkit.shapes.recipes.train_diffusion, or `clipkit train diffusion`)")
    dtype = export_dtype(cfg.export_dtype)
    acc = accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    unet_cfg = cfg.unet_cfg or SHAPES_UNET_CFG
    if cfg.init:
        init = Path(cfg.init)
        where = init / "unet" if (init / "unet").is_dir() else init
        try:                                    # safetensors only: pickled weights (.bin) are never unpickled
            if not (where / "diffusion_pytorch_model.safetensors").is_file():
                raise InputError(f"no diffusion_pytorch_model.safetensors in {where}")
            unet = UNet2DModel.from_pretrained(where, torch_dtype=torch.float32, use_safetensors=True)
        except Exception as e:
            raise InputError(f"--init {cfg.init}: not a diffusers UNet with safetensors weights ({one_line(e)}); "
                             "pickled .bin weights are never loaded: convert them with diffusers' save_pretrained") from None
    else:
        unet = UNet2DModel(**unet_cfg)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
    noise_sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    size = unet.config.sample_size
    gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
    dd = data(cfg, size, gen, acc.num_processes)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    unet, opt = acc.prepare(unet, opt)
    batches = acc.prepare(dd.batches) if isinstance(dd.batches, DataLoader) else dd.batches
    ema.to(acc.device)
    raw = acc.unwrap_model(unet)

    def step_fn(batch) -> StepOutput:
        x0 = dd.to_images(batch) * 2 - 1                                       # [-1, 1]
        B = x0.shape[0]
        # Ho et al. 2020, Alg. 1: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
        t = torch.randint(0, cfg.num_train_timesteps, (B,), device=x0.device, generator=gen)
        eps = torch.randn(x0.shape, device=x0.device, generator=gen)
        xt = noise_sched.add_noise(x0, eps, t)
        with acc.autocast():
            pred = unet(xt, t).sample
        return StepOutput(F.mse_loss(pred.float(), eps), B)

    def after_step(step):
        ema.step(raw.parameters())

    def ema_unet(device=None):
        # a plain model built from the config: a copy of the prepared one would keep accelerate's
        # autocast forward, and eval samples / exports would not be fp32
        m = UNet2DModel.from_config(raw.config).to(acc.device)
        ema.copy_to(m.parameters())
        return m.eval() if device is None else m.to(device).eval()

    def eval_fn(step):
        g = torch.Generator(device="cpu").manual_seed(1234)
        imgs = sample_ddim(ema_unet(), dict(noise_sched.config), cfg.eval_samples, cfg.eval_steps, g, acc.device)
        import torchvision

        from clipkit.core.outputs import write_atomic
        write_atomic(out / f"samples_{step:06d}.png", lambda t: torchvision.utils.save_image(
            imgs[:64], t, nrow=8, padding=1, pad_value=0.3), overwrite=True)
        return dd.judge(imgs) if dd.judge is not None else {}

    settings = LoopSettings(
        out_dir=out, steps=cfg.steps, warmup=min(cfg.warmup, cfg.steps // 10),   # a short run still decays
        log_columns=["step", "loss", "lr", "samples_per_s"],
        grad_clip=1.0, log_every=cfg.log_every, save_every=cfg.save_every, eval_every=cfg.eval_every,
        eval_columns=["step", *dd.eval_columns], resume=cfg.resume, time_limit_s=cfg.time_limit_s,
        progress=progress, desc="train diffusion", train_plot=(["loss", "lr"], "DDPM training"))
    run = train_loop(acc, unet, opt, batches, step_fn, settings, eval_fn=eval_fn, after_step=after_step,
                     state_objects=[_EmaState(ema, acc.device)], rng=RngStates({f"gen{acc.process_index}": gen},
                                                                               cfg.seed), config=cfg)
    model_dir = out / "model"
    if acc.is_main_process:
        export = ema_unet("cpu").to(dtype)
        from clipkit.core.outputs import atomic_dir
        with atomic_dir(model_dir, overwrite=True) as tmp:       # never half a model, never through a link
            DDPMPipeline(unet=export, scheduler=noise_sched).save_pretrained(tmp, safe_serialization=True)
            (tmp / "clipkit_training.json").write_text(json.dumps(
                {"training": asdict(cfg), "eval": run.final_eval, "steps": run.steps}, indent=2))
    return DiffusionTrainResult(str(out), str(model_dir), run.steps, run.wall_s, run.final_eval)
