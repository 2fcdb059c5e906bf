"""Generation conformance: with CLIP guidance off (``clip_scale=0`` / ``--clip-scale 0``), clipkit's images
are diffusers' own pipelines' images, pixel for pixel.

Every expected image comes from calling a diffusers pipeline object, loaded with ``from_pretrained`` from
the directory clipkit reads, with ``generator=torch.Generator().manual_seed(seed)`` and a batch of one
(clipkit samples candidate k of ``seed=S`` alone with seed ``S + k``), output as PIL (diffusers' own uint8
conversion). Never from clipkit code. Tolerance: max |diff| <= 1/255 per pixel (measured: 0).

References, by clipkit scheduler:

* pixel models (a ``DDPMPipeline`` directory; epsilon and v-prediction, ``clip_sample`` on as DDPM's default):
  ``ddim`` -> ``DDIMPipeline(unet, scheduler)`` (it converts the scheduler to DDIM), eta 0;
  ``ddpm`` -> the loaded ``DDPMPipeline`` itself; ``pndm`` -> ``PNDMPipeline(unet, scheduler)`` (PRK warm-up,
  as PNDMPipeline does); ``dpmpp`` -> ``DDPMPipeline(unet, DPMSolverMultistepScheduler.from_config(...,
  algorithm_type="dpmsolver++"))`` (valid: DDPMPipeline skips ``init_noise_sigma``/``scale_model_input``,
  which are 1/identity for DPM-Solver, asserted). ``euler``, ``euler_a``, ``lms`` have no diffusers pixel
  pipeline (they need ``init_noise_sigma``/``scale_model_input``, which the unconditional pipelines skip);
  their sampling loop is the one the latent rows check against StableDiffusionPipeline.
* latent models (a ``StableDiffusionPipeline`` directory with an SD-1.x scheduler config: PNDM without
  PRK steps, scaled-linear betas, ``clip_sample: false``): ``StableDiffusionPipeline.from_pretrained``
  with ``pipe.scheduler = <Class>.from_config(pipe.scheduler.config)`` (diffusers' documented swap; for
  ``pndm`` the pipeline as loaded), same steps, ``guidance_scale`` = clipkit's ``cfg_scale`` (clipkit's
  default 7.5 is diffusers' default), ``negative_prompt`` = clipkit's ``negative`` (``--negative``: its texts
  not made from ``{prompt}``, joined with ", ", are the CFG negative prompt).

Scope: ``cfg_scale`` >= 1. Below 1 the two differ by design: diffusers switches classifier-free guidance
off for ``guidance_scale <= 1`` (the conditional model alone), clipkit applies ``u + s (c - u)`` for every
``s`` (``cfg_scale=0``: the unconditional model). At 1 both are the conditional model alone (a row here).

Run ``pytest -q -s tests/conformance/test_generation.py`` to see the rows (``CONFORMANCE | ...``).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clipkit.cli.main import cli
from clipkit.guidance.diffusion import load_diffusion
from clipkit.guidance.pipeline import generate
from clipkit.guidance.results import slugify
from helpers import make_sd_components, save_sd_pipeline, sd_scheduler_config   # tests/ is on sys.path

TOL = 1                 # in 1/255 units (uint8 levels)
PROMPT = "a red circle on a blue square"
NEGATIVE = "a green triangle"
PIXEL_STEPS = 6         # PNDM with its Runge-Kutta warm-up needs a few
LATENT_STEPS = 4
PIXEL_SCHEDULERS = ("ddim", "ddpm", "pndm", "dpmpp")
LATENT_SCHEDULERS = ("ddim", "ddpm", "euler", "euler_a", "lms", "dpmpp", "pndm")
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                     "euler_a": "EulerAncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler",
                     "dpmpp": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convolutions on a shared CPU: one thread is faster; both sides run the same ops either way
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def report(row: str, reference: str, diff: int) -> None:
    print(f"\nCONFORMANCE | {row} | {reference} | {diff}/255")


def max_diff(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, (a.shape, b.shape, a.dtype, b.dtype)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def check(row: str, reference: str, got, expected) -> None:
    d = max_diff(got, expected)
    report(row, reference, d)
    assert d <= TOL, f"{row}: max |diff| {d}/255 against {reference}"


@pytest.fixture(scope="module")
def scorer(tiny_openclip_dir):
    from clipkit.core.scorer import load_scorer
    return load_scorer(str(tiny_openclip_dir), device="cpu")


# --------------------------------------------------------------------------------------------
# pixel: DDPMPipeline directories
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def ddpm_dir(request, tmp_path_factory):
    """A random 16x16 UNet2DModel + DDPMScheduler (100 train steps, clip_sample on) saved by DDPMPipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    path = tmp_path_factory.mktemp(f"ddpm_{request.param}")
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=request.param)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def _ddpm_pipeline(path: str):
    import diffusers
    from diffusers import DDPMPipeline
    diffusers.utils.logging.disable_progress_bar()
    return DDPMPipeline.from_pretrained(path)


def pixel_reference(path, scheduler: str):
    """(diffusers pipeline, call kwargs) that samples ``path`` with clipkit's ``scheduler``; a fresh
    scheduler every call (the networks are loaded once per directory)."""
    from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, PNDMPipeline
    base = _ddpm_pipeline(str(path))
    unet, config = base.unet, base.scheduler.config
    if scheduler == "ddpm":
        pipe, kw = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config)), {}
    elif scheduler == "ddim":
        pipe, kw = DDIMPipeline(unet=unet, scheduler=base.scheduler), {"eta": 0.0}   # converts it to DDIM
    elif scheduler == "pndm":
        pipe, kw = PNDMPipeline(unet=unet, scheduler=base.scheduler), {}              # converts it to PNDM
    else:
        dpm = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
        dpm.set_timesteps(PIXEL_STEPS)
        x = torch.randn(1, 3, 4, 4)
        assert dpm.init_noise_sigma == 1 and torch.equal(dpm.scale_model_input(x, dpm.timesteps[0]), x)
        pipe, kw = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(dpm.config)), {}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


def pixel_expected(path, scheduler: str, seed: int) -> Image.Image:
    pipe, kw = pixel_reference(path, scheduler)      # fresh scheduler state per image, as clipkit's
    return pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=PIXEL_STEPS,
                output_type="pil", **kw).images[0]


@pytest.mark.parametrize("scheduler", PIXEL_SCHEDULERS)
def test_pixel_api_equals_the_diffusers_pipeline(ddpm_dir, scorer, scheduler):
    pt = json.loads((ddpm_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    res = generate(PROMPT, n=2, seed=11, steps=PIXEL_STEPS, scheduler=scheduler, clip_scale=0.0,
                   diffusion=load_diffusion(str(ddpm_dir), device="cpu"), clip=scorer)
    ref = type(pixel_reference(ddpm_dir, scheduler)[0]).__name__
    images = sorted(res.images, key=lambda im: im.seed)
    assert [im.seed for im in images] == [11, 12]
    for im in images:                                           # candidate k: seed 11 + k, sampled alone
        check(f"pixel {pt} {scheduler} seed {im.seed} (generate)", ref, im.image,
              pixel_expected(ddpm_dir, scheduler, im.seed))
    assert max_diff(images[0].image, images[1].image) > 100    # the comparison can tell seeds apart


def test_pixel_cli_png_equals_the_diffusers_pipeline(ddpm_dir, tiny_openclip_dir, tmp_path):
    pt = json.loads((ddpm_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["-q", "generate", PROMPT, "--diffusion", str(ddpm_dir), "--clip",
                                   str(tiny_openclip_dir), "--clip-scale", "0", "--seed", "5", "-n", "1",
                                   "--steps", str(PIXEL_STEPS), "--out", str(out)])
    assert res.exit_code == 0, res.output
    png = Image.open(out / f"{slugify(PROMPT)}-5.png")
    assert png.mode == "RGB"
    check(f"pixel {pt} ddim seed 5 (CLI PNG, default scheduler)", "DDIMPipeline", png,
          pixel_expected(ddpm_dir, "ddim", 5))


# --------------------------------------------------------------------------------------------
# latent: StableDiffusionPipeline directories
# --------------------------------------------------------------------------------------------

def _save_sd(root, prediction_type: str):
    """A tiny random SD pipeline (32x32 images) whose scheduler config is SD 1.x's (PNDM, no PRK steps,
    ``clip_sample: false`` kept in the config as SD's own scheduler_config.json has it)."""
    from diffusers import PNDMScheduler
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    comps = make_sd_components(root / "tok", prediction_type=prediction_type)
    comps.scheduler = PNDMScheduler.from_config({**sd_scheduler_config(prediction_type), "clip_sample": False})
    return save_sd_pipeline(comps, root / "sd")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return _save_sd(tmp_path_factory.mktemp("sd_eps"), "epsilon")


@pytest.fixture(scope="module")
def sd_v_dir(tmp_path_factory):
    return _save_sd(tmp_path_factory.mktemp("sd_v"), "v_prediction")


@functools.lru_cache(maxsize=None)
def _sd_pipeline(path: str):
    import diffusers
    from diffusers import StableDiffusionPipeline
    diffusers.utils.logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config          # the scheduler config as saved


def sd_expected(path, scheduler: str, seed: int, guidance_scale: float = 7.5, negative_prompt=None,
                steps: int = LATENT_STEPS) -> Image.Image:
    """StableDiffusionPipeline's image with the scheduler swapped in the documented way
    (``pipe.scheduler = Class.from_config(pipe.scheduler.config)``), fresh for every call."""
    import diffusers
    pipe, config = _sd_pipeline(str(path))
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[scheduler]).from_config(config)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]


@pytest.fixture(scope="module")
def sd_backend(sd_dir):
    return load_diffusion(str(sd_dir), device="cpu")


@pytest.mark.parametrize("scheduler", LATENT_SCHEDULERS)
def test_latent_api_equals_stable_diffusion(sd_dir, sd_backend, scorer, scheduler):
    res = generate(PROMPT, n=1, seed=3, steps=LATENT_STEPS, scheduler=scheduler, clip_scale=0.0, cfg_scale=5.0,
                   diffusion=sd_backend, clip=scorer)
    check(f"latent epsilon {scheduler} cfg 5 seed 3 (generate)", "StableDiffusionPipeline", res.images[0].image,
          sd_expected(sd_dir, scheduler, 3, guidance_scale=5.0))


def test_latent_default_cfg_and_seeds(sd_dir, sd_backend, scorer):
    """clipkit's default cfg_scale (7.5) is diffusers' default guidance_scale; candidate k uses seed + k."""
    res = generate(PROMPT, n=2, seed=8, steps=LATENT_STEPS, clip_scale=0.0, diffusion=sd_backend, clip=scorer)
    assert res.config.cfg_scale == 7.5
    images = sorted(res.images, key=lambda im: im.seed)
    assert [im.seed for im in images] == [8, 9]
    for im in images:
        check(f"latent epsilon ddim default cfg seed {im.seed} (generate n=2)", "StableDiffusionPipeline",
              im.image, sd_expected(sd_dir, "ddim", im.seed))
    assert max_diff(images[0].image, images[1].image) > 100    # the comparison can tell seeds apart


def test_latent_cfg_one_is_the_conditional_model_on_both_sides(sd_dir, sd_backend, scorer):
    one = generate(PROMPT, n=1, seed=2, steps=LATENT_STEPS, clip_scale=0.0, cfg_scale=1.0, diffusion=sd_backend,
                   clip=scorer).images[0]
    check("latent epsilon ddim cfg 1 seed 2 (generate)", "StableDiffusionPipeline", one.image,
          sd_expected(sd_dir, "ddim", 2, guidance_scale=1.0))


def test_latent_other_size_equals_stable_diffusion(sd_dir, sd_backend, scorer):
    im = generate(PROMPT, n=1, seed=1, steps=LATENT_STEPS, clip_scale=0.0, cfg_scale=5.0, size=48,
                  diffusion=sd_backend, clip=scorer).images[0]
    assert im.image.size == (48, 48)
    import diffusers
    pipe, config = _sd_pipeline(str(sd_dir))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    expected = pipe(PROMPT, height=48, width=48, num_inference_steps=LATENT_STEPS, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(1), output_type="pil").images[0]
    check("latent epsilon ddim cfg 5 size 48 seed 1 (generate)", "StableDiffusionPipeline", im.image, expected)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_latent_v_prediction_equals_stable_diffusion(sd_v_dir, scorer, scheduler):
    v = generate(PROMPT, n=1, seed=4, steps=LATENT_STEPS, clip_scale=0.0, cfg_scale=5.0, scheduler=scheduler,
                 diffusion=str(sd_v_dir), clip=scorer).images[0]
    check(f"latent v_prediction {scheduler} cfg 5 seed 4 (generate)", "StableDiffusionPipeline", v.image,
          sd_expected(sd_v_dir, scheduler, 4, guidance_scale=5.0))


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_latent_negative_prompt_equals_stable_diffusion(sd_dir, sd_backend, scorer, scheduler):
    got = generate(PROMPT, n=1, seed=9, steps=LATENT_STEPS, scheduler=scheduler, clip_scale=0.0, cfg_scale=6.0,
                   negative=[NEGATIVE], diffusion=sd_backend, clip=scorer).images[0].image
    expected = sd_expected(sd_dir, scheduler, 9, guidance_scale=6.0, negative_prompt=NEGATIVE)
    check(f"latent epsilon {scheduler} cfg 6 negative prompt seed 9 (generate negative=)", "StableDiffusionPipeline",
          got, expected)
    # the negative prompt really is used (not the empty one)
    assert max_diff(got, sd_expected(sd_dir, scheduler, 9, guidance_scale=6.0)) > TOL


def test_latent_cli_png_equals_stable_diffusion(sd_dir, tiny_openclip_dir, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["-q", "generate", PROMPT, "--diffusion", str(sd_dir), "--clip",
                                   str(tiny_openclip_dir), "--clip-scale", "0", "--seed", "6", "-n", "1",
                                   "--steps", str(LATENT_STEPS), "--cfg-scale", "4", "--scheduler", "euler_a",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    png = Image.open(out / f"{slugify(PROMPT)}-6.png")
    check("latent epsilon euler_a cfg 4 seed 6 (CLI PNG)", "StableDiffusionPipeline", png,
          sd_expected(sd_dir, "euler_a", 6, guidance_scale=4.0))
