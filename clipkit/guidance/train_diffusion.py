"""DDPM training of the bundled unconditional Shapes model (``clipkit train diffusion``).

A diffusers ``UNet2DModel`` at 32x32 learns eps-prediction (Ho et al. 2020, Alg. 1) on Shapes renders
drawn on the device; an EMA of the weights is what gets exported, as a diffusers ``DDPMPipeline``
directory (``model_index.json`` + ``unet/`` + ``scheduler/``, safetensors), so the same loader reads it
and any ``google/ddpm-*`` repository. During training, samples are drawn with DDIM and judged by the
oracle: the fraction with a valid Shapes object and the colour/position histograms are logged.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipkit.core.errors import InputError

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
    """Unguided DDIM (eta=0) samples in [0, 1], [n, 3, H, W]."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    size = unet.config.sample_size
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        x = torch.randn(b, 3, size, size, generator=generator, device=generator.device).to(device)
        for t in sched.timesteps:
            with torch.no_grad():
                eps = unet(x, t).sample
            x = sched.step(eps, t, x).prev_sample
        out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def judge_samples(images: torch.Tensor) -> dict:
    """Oracle statistics of unguided samples: valid-object rate and attribute histograms."""
    from clipkit.shapes.oracle import read_attributes
    valid, n_obj = 0, Counter()
    colors, positions, shapes = Counter(), Counter(), Counter()
    for im in images:
        found = read_attributes(im)
        n_obj[len(found)] += 1
        good = [o for o in found if o.valid]
        if good and len(good) == len(found) and len(found) <= 2:
            valid += 1
        for o in good:
            colors[o.color] += 1
            positions[o.position] += 1
            shapes[o.shape] += 1
    return {"valid": valid / len(images), "objects": dict(sorted(n_obj.items())),
            "colors": dict(colors), "positions": dict(positions), "shapes": dict(shapes)}


def train_diffusion(cfg: TrainDiffusionConfig, progress: bool = True) -> DiffusionTrainResult:
    from accelerate.utils import set_seed
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    from clipkit.core.training import CsvLog, load_checkpoint, plan_steps, resume_step, plot_curves, save_checkpoint, warmup_cosine
    from clipkit.shapes.data import ShapesCaptions, collate
    from clipkit.shapes.render import render

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError("steps and batch_size must be >= 1")
    from clipkit.core.dist import accelerator
    acc = accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt_dir, ema_dir = out / "checkpoint", out / "checkpoint_ema"
    unet_cfg = cfg.unet_cfg or SHAPES_UNET_CFG
    if cfg.init:
        init = Path(cfg.init)
        unet = UNet2DModel.from_pretrained(init / "unet" if (init / "unet").is_dir() else init,
                                           torch_dtype=torch.float32)
    else:
        unet = UNet2DModel(**unet_cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    size = unet.config.sample_size
    ds = ShapesCaptions("train", length=cfg.steps * cfg.batch_size * acc.num_processes, p_two=cfg.p_two)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=collate, drop_last=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
    rng = {f"gen{acc.process_index}": gen}          # saved in checkpoints, restored on resume
    step = resume_step(ckpt_dir, unet, opt, cfg.resume, rng=rng)
    if step and not acc.is_main_process:      # only the main process's state is in the checkpoint
        gen.manual_seed(cfg.seed * 1000 + acc.process_index + step)
    if cfg.resume:
        load_checkpoint(ema_dir, ema)
    elif acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    unet, opt = acc.prepare(unet, opt)
    if not cfg.device_data:
        loader = acc.prepare(loader)
    ema.to(acc.device)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup), last_epoch=step - 1 if step else -1)
    abar = noise_sched.alphas_cumprod.to(acc.device)
    raw = acc.unwrap_model(unet)
    logf = CsvLog(out / "train_log.csv", ["step", "loss", "lr", "samples_per_s"], append=cfg.resume,
                  resume_from=step) if acc.is_main_process else None
    evalf = CsvLog(out / "eval_log.csv", ["step", "valid", "colors", "positions", "objects"],
                   append=cfg.resume, resume_from=step) if acc.is_main_process else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and acc.is_main_process), desc="train diffusion")
    if cfg.device_data:
        from clipkit.shapes.render import random_params
        data_iter = None
    else:
        data_iter = iter(acc.skip_first_batches(loader, step) if step else loader)
    start_step = step
    t0, seen, last_eval = time.time(), 0, {}
    unet.train()
    while step < cfg.steps:
        if data_iter is None:
            params = random_params(cfg.batch_size, gen, cfg.p_two)
        else:
            try:
                params = next(data_iter)["params"]
            except StopIteration:
                data_iter = iter(loader)
                continue
        x0 = render(params, size=size) * 2 - 1                                 # [-1, 1]
        B = x0.shape[0]
        t = torch.randint(0, cfg.num_train_timesteps, (B,), device=x0.device, generator=gen)
        eps = torch.randn(x0.shape, device=x0.device, generator=gen)
        a = abar[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with acc.autocast():
            pred = unet(xt, t).sample
        loss = F.mse_loss(pred.float(), eps)
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), raw.parameters()):
                pe.lerp_(p.detach(), 1 - d)
        step += 1
        if cfg.time_limit_s and step == start_step + 50:
            t_mark = time.time()      # measure the rate after start-up (workers, kernels) is over
        if cfg.time_limit_s and step == start_step + 300:
            plan_steps(cfg, 250, time.time() - t_mark, step, time.time() - t0)
        seen += B
        bar.update(1)
        if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.steps):
            logf.write(step=step, loss=loss.item(), lr=sched.get_last_lr()[0],
                       samples_per_s=seen * acc.num_processes / (time.time() - t0))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if acc.is_main_process and (step % cfg.eval_every == 0 or step == cfg.steps):
            ema.eval()
            g = torch.Generator(device="cpu").manual_seed(1234)
            imgs = sample_ddim(ema, dict(noise_sched.config), cfg.eval_samples, cfg.eval_steps, g, acc.device)
            last_eval = judge_samples(imgs)
            evalf.write(step=step, valid=last_eval["valid"], colors=json.dumps(last_eval["colors"]),
                        positions=json.dumps(last_eval["positions"]), objects=json.dumps(last_eval["objects"]))
            import torchvision
            from clipkit.core.outputs import write_atomic
            write_atomic(out / f"samples_{step:06d}.png", lambda t: torchvision.utils.save_image(
                imgs[:64], t, nrow=8, padding=1, pad_value=0.3), overwrite=True)
            log.info("step %d eval valid=%.3f", step, last_eval["valid"])
        if step % cfg.save_every == 0 or step == cfg.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(ckpt_dir, raw, opt, step, cfg, {"eval": last_eval}, rng=rng)
                save_checkpoint(ema_dir, ema, opt, step, cfg)
                plot_curves(out / "train_log.csv", out / "train_curves.png", ys=["loss", "lr"],
                            title="DDPM training")
    bar.close()
    acc.wait_for_everyone()
    model_dir = out / "model"
    if acc.is_main_process:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.export_dtype]
        export = copy.deepcopy(ema).to("cpu", dtype)
        from clipkit.core.outputs import atomic_dir
        with atomic_dir(model_dir, overwrite=True) as tmp:       # never half a model, never through a link
            DDPMPipeline(unet=export, scheduler=noise_sched).save_pretrained(tmp, safe_serialization=True)
            (tmp / "clipkit_training.json").write_text(json.dumps(
                {"training": asdict(cfg), "eval": last_eval}, indent=2))
        logf.close()
        evalf.close()
    return DiffusionTrainResult(str(out), str(model_dir), step, time.time() - t0, last_eval)
