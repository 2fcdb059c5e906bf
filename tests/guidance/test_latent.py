"""Latent (Stable Diffusion style) backend: CFG + CLIP guidance through the VAE, on tiny random components,
through the one generate path (``pipeline.generate(..., diffusion=LatentDiffusion(comps))``)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipkit.core.objectives import ClipTarget

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.core.losses import spherical_dist
from clipkit.guidance.backends import Conditioning
from clipkit.guidance.config import make_config
from clipkit.guidance.latent import (LatentDiffusion, encode_prompts, latent_step, load_latent_pipeline,
                                     make_cfg_model)
from clipkit.guidance.pipeline import generate
from clipkit.guidance.schedulers import SCHEDULER_NAMES, make_scheduler
from clipkit.guidance.parametrisation import abar_at
from clipkit.guidance.sampling import denoise_step, sample
from clipkit.guidance.wrapper import GuidanceConfig, GuidedDenoiser, make_views
from helpers import assert_seed_fixes_the_image, make_sd_components, save_sd_pipeline   # tests/ is on sys.path

PROMPTS = ["a red circle", "a blue square"]
# CLIP guidance of these tests: normalised x0 steps of RMS 0.5, 2 views, every step guided
GUIDED = dict(clip_scale=0.5, views=2, guide_stop=0.0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sd_tok")


@pytest.fixture(scope="module")
def comps(tok_dir):
    return make_sd_components(tok_dir)


@pytest.fixture(scope="module")
def scorer(tiny_openclip_dir):
    from clipkit.core.scorer import load_scorer
    return load_scorer(str(tiny_openclip_dir), device="cpu")


def guided_cfg(**kw):
    base = dict(scale=100.0, views=2, jitter=1, x0_step=0.5)
    return GuidanceConfig(**{**base, **kw})


def final_latent(pipe: LatentDiffusion, text: str, seed: int, negative: str | None = None, **options) -> torch.Tensor:
    """The last latent of ``pipe``'s unguided trajectory for (text, seed) under GenerateConfig ``options``."""
    config = pipe.check(make_config(None, {"clip_scale": 0.0, **options}).resolve_target(False, pipe.guide_targets))
    return list(pipe.trajectory(Conditioning(None, text, negative), seed, config))[-1].x


def keep_latents(pipe: LatentDiffusion) -> list:
    """Record the final latents ``pipe`` decodes (generate decodes each kept image's once)."""
    seen = []
    decode = pipe.to_pixels

    def to_pixels(z):
        seen.append(z.detach().clone())
        return decode(z)
    pipe.to_pixels = to_pixels
    return seen


def reference_latent(comps, text: str, seed: int, steps: int, cfg_scale: float, negative: str = "") -> torch.Tensor:
    """diffusers' loop written out, batch of one: noise first from the seeded generator, then DDIM over
    ``u + s (c - u)`` from two separate UNet calls (the conditional model alone at s = 1)."""
    sched = make_scheduler("ddim", comps.scheduler.config, latent=True)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    c_emb, u_emb = encode_prompts(comps, [text]), encode_prompts(comps, [negative])

    def model(x, t):
        c = comps.unet(x, t, encoder_hidden_states=c_emb).sample
        if cfg_scale == 1:
            return c
        u = comps.unet(x, t, encoder_hidden_states=u_emb).sample
        return u + cfg_scale * (c - u)
    return sample(denoise_step(model, sched, g), sched, (1, 4, 8, 8), steps, g, noise=noise)


def test_cfg_combination_and_scale_one_is_the_conditional_model(comps):
    cond = encode_prompts(comps, PROMPTS)
    uncond = encode_prompts(comps, ["", ""])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        u = comps.unet(x, t, encoder_hidden_states=uncond).sample
        c = comps.unet(x, t, encoder_hidden_states=cond).sample
        got = make_cfg_model(comps.unet, cond, uncond, 3.0)(x, t)
        one = make_cfg_model(comps.unet, cond, uncond, 1.0)(x, t)
    assert torch.allclose(got, u + 3.0 * (c - u), atol=1e-4)              # uncond first, cond second
    assert torch.allclose(one, c, atol=1e-5)
    with pytest.raises(InputError, match="does not match"):
        make_cfg_model(comps.unet, cond, uncond[:1], 2.0)
    with pytest.raises(InputError, match="does not match"):                # one negative per text
        latent_step(comps, PROMPTS, ["dark"], 2.0, torch.Generator())
    # the backend's trajectory for seed S is diffusers' loop with the same seed: at cfg_scale 1 the
    # plain conditional sampler, else u + s (c - u) with the negative prompt as the unconditional text
    pipe = LatentDiffusion(comps)
    ref = reference_latent(comps, PROMPTS[0], 3, 4, 1.0)
    assert torch.allclose(final_latent(pipe, PROMPTS[0], 3, steps=4, cfg_scale=1.0), ref, atol=1e-5)
    ref = reference_latent(comps, PROMPTS[1], 3, 4, 5.0, negative="dark")
    got = final_latent(pipe, PROMPTS[1], 3, "dark", steps=4, cfg_scale=5.0)
    assert torch.allclose(got, ref, atol=1e-4)
    plain = final_latent(pipe, PROMPTS[1], 3, steps=4, cfg_scale=5.0)       # negative None: ""
    assert torch.allclose(plain, reference_latent(comps, PROMPTS[1], 3, 4, 5.0), atol=1e-4)
    assert (plain - got).abs().max() > 1e-2                                 # the negative prompt matters


def test_prompts_and_seeds_are_sampled_alone_with_their_negative(comps, scorer):
    """Candidate k of every prompt is seed + k sampled alone: each image of a run of 2 prompts x 2 seeds
    is the one-image run of its (prompt, seed); ``negative`` texts (not ``{prompt}`` ones) are the CFG
    negative prompt."""
    pipe = LatentDiffusion(comps)
    kw = dict(steps=3, cfg_scale=5.0, clip_scale=0.0, diffusion=pipe, clip=scorer)
    res = generate(PROMPTS, n=2, seed=0, negative=["blurry"], **kw)
    assert sorted((im.prompt, im.seed) for im in res.images) == sorted((p, s) for p in PROMPTS for s in (0, 1))
    assert all(im.image.size == (32, 32) and np.isfinite(im.clip_score) for im in res.images)
    got = {(im.prompt, im.seed): np.asarray(im.image) for im in res.images}
    for (prompt, seed), arr in got.items():
        alone = generate(prompt, n=1, seed=seed, negative=["blurry"], **kw).images[0]
        assert np.array_equal(arr, np.asarray(alone.image))
    assert not np.array_equal(got[(PROMPTS[0], 0)], got[(PROMPTS[0], 1)])     # seeds differ
    assert not np.array_equal(got[(PROMPTS[0], 0)], got[(PROMPTS[1], 0)])     # prompts differ
    p = res.to_dict()["parameters"]
    assert p["cfg_scale"] == 5.0 and p["negative"] == ["blurry"]
    # the negative prompt is used: the same seed without it (or with a {prompt} negative only, which as
    # the CFG negative prompt would cancel the prompt itself) is another image
    plain = generate(PROMPTS[0], n=1, seed=0, **kw).images[0].image
    templated = generate(PROMPTS[0], n=1, seed=0, negative=["{prompt}, blurry"], **kw).images[0].image
    assert not np.array_equal(np.asarray(plain), got[(PROMPTS[0], 0)])
    assert np.array_equal(np.asarray(templated), np.asarray(plain))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clip_guidance_raises_the_guiding_clip_similarity(tok_dir, scorer, prediction_type):
    history = []
    pipe = LatentDiffusion(make_sd_components(tok_dir, prediction_type), on_stats=history.append)
    assert pipe.components.scheduler.config.prediction_type == prediction_type
    kw = dict(n=1, seed=0, steps=4, cfg_scale=3.0, diffusion=pipe, clip=scorer)
    base = {im.prompt: im for im in generate(PROMPTS, **kw, clip_scale=0.0).images}
    assert history == []                                          # unguided: no guided step
    guided = {im.prompt: im for im in generate(PROMPTS, **kw, **GUIDED).images}
    assert len(history) == 2 * 4 and all(np.isfinite(h.loss) and h.grad_rms > 0 for h in history)
    for p in PROMPTS:
        assert guided[p].clip_score - base[p].clip_score > 0.02, (p, base[p].clip_score, guided[p].clip_score)
    # guiding towards the other prompt helps that prompt, not this one: the gain is prompt-specific
    for p, other in zip(PROMPTS, PROMPTS[::-1]):
        mine = float((scorer.encode_images([guided[other].image]) * scorer.text_embeddings([p])).sum(-1))
        assert guided[p].clip_score > mine, (p, guided[p].clip_score, mine)


def test_v_prediction_x0_is_the_schedulers_x0(tok_dir, scorer):
    comps = make_sd_components(tok_dir, "v_prediction")
    sched = comps.scheduler
    sched.set_timesteps(5)
    t = sched.timesteps[1]
    cond = encode_prompts(comps, PROMPTS)
    model = make_cfg_model(comps.unet, cond, encode_prompts(comps, ["", ""]), 2.0)
    seen = []

    def spy(z):
        seen.append(z.detach().clone())
        return comps.decode(z)
    guide = GuidedDenoiser(model, sched, ClipTarget(scorer, scorer.text_embeddings(PROMPTS)[:, None]), guided_cfg(),
                           decode=lambda z: (spy(z) + 1) / 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = guide.correction(x, t).out
    ref = sched.step(out, t, x).pred_original_sample
    assert torch.allclose(seen[0], ref, atol=1e-4)


def test_chunked_view_gradient_equals_the_direct_gradient(comps, scorer):
    """Views one at a time under checkpointing, through the VAE decoder: the same loss and gradient as
    autograd over one plain graph (per-sample targets, tv/range/saturation on the decoded x0)."""
    cfg = GuidanceConfig(scale=10.0, views=3, jitter=1, cutouts=1, tv_scale=0.5, range_scale=2.0, sat_scale=1.0,
                         view_chunk=1)
    tg = scorer.text_embeddings(PROMPTS)[:, None]
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    a = abar_at(torch.linspace(0.99, 0.01, 10, dtype=torch.float64), 4, 2, "cpu")
    decode = lambda z: (comps.decode(z) + 1) / 2  # noqa: E731
    guide = GuidedDenoiser(None, comps.scheduler, ClipTarget(scorer, tg), cfg, decode=decode,
                           generator=torch.Generator().manual_seed(7))
    zg = z0.clone().requires_grad_(True)
    loss = guide.x0_loss(zg, zg, a, 4)
    (g_chunked,) = torch.autograd.grad(loss.sum(), zg)

    zr = z0.clone().requires_grad_(True)                                   # reference: one plain graph
    pix = decode(zr)
    pix_st = pix + (pix.clamp(0, 1) - pix).detach()
    views = make_views(pix_st, cfg, torch.Generator().manual_seed(7))     # view-major [4*2, ...]
    emb = scorer.embed_pixels(views).view(4, 2, -1).transpose(0, 1)      # [2 samples, 4 views, D]
    ref = spherical_dist(emb[:, :, None], tg[:, None]).mean(dim=(1, 2)) * cfg.scale
    ref = ref + 0.5 * ((pix[..., 1:, :] - pix[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
                       + (pix[..., :, 1:] - pix[..., :, :-1]).pow(2).mean(dim=(1, 2, 3)))
    excess = pix - pix.clamp(0, 1)
    ref = ref + 2.0 * excess.pow(2).mean(dim=(1, 2, 3)) + excess.abs().mean(dim=(1, 2, 3))
    (g_ref,) = torch.autograd.grad(ref.sum(), zr)
    assert torch.allclose(loss.detach(), ref.detach(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_chunked, g_ref, rtol=1e-3, atol=1e-6 * g_ref.abs().max())
    assert (g_ref.abs() > 0).float().mean() > 0.5


def test_memory_one_unet_pass_one_decode_per_step_and_no_param_grads(comps, scorer):
    calls = {"unet": 0, "decoder": 0, "decoder_bwd": 0, "clip": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook
    visual = scorer.backend.module.visual
    handles = [comps.unet.register_forward_hook(count("unet")),
               comps.vae.decoder.register_forward_hook(count("decoder")),
               comps.vae.decoder.register_full_backward_hook(count("decoder_bwd")),
               visual.register_forward_hook(count("clip"))]
    history = []
    pipe = LatentDiffusion(comps, view_batch=2, on_stats=history.append)
    latents = keep_latents(pipe)
    kw = dict(n=1, seed=0, steps=3, cfg_scale=4.0, clip=scorer, **{**GUIDED, "views": 3}, cutouts=1,
              grad_mode="unet")
    try:
        generate(PROMPTS[0], diffusion=pipe, **kw)
    finally:
        for h in handles:
            h.remove()
    assert len(history) == 3
    assert calls["unet"] == 3                      # one batched [uncond; cond] pass per step, reused
    assert calls["decoder"] == 3 + 1               # one decode per guided step + the final decode
    assert calls["decoder_bwd"] == 3               # one VJP through the VAE per step
    # 1 image x 4 views in chunks of 2 views -> 2 CLIP forwards per step, each run again by
    # checkpointing in the backward pass; + 1 final scoring pass
    assert calls["clip"] == 3 * 2 * 2 + 1
    for m in (comps.unet, comps.vae, comps.text_encoder, scorer.backend.module):
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    # chunking changes memory, not the result
    one_chunk = LatentDiffusion(comps, view_batch=0)
    same = keep_latents(one_chunk)
    generate(PROMPTS[0], diffusion=one_chunk, **kw)
    assert torch.allclose(same[0], latents[0], atol=1e-4, rtol=1e-4)


def test_seed_alone_fixes_a_guided_ancestral_image(comps, scorer):
    """Euler ancestral (noise every step) with guidance, views and a cutout: seed S gives the same image
    twice and inside a run of seeds; another seed another image."""
    assert_seed_fixes_the_image(generate, PROMPTS[0], other_seed=4, diffusion=LatentDiffusion(comps), clip=scorer,
                                steps=3, cfg_scale=3.0, scheduler="euler_a", cutouts=1, **GUIDED)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_scheduler_runs_guided(tok_dir, comps, scorer, name, prediction_type):
    c = comps if prediction_type == "epsilon" else make_sd_components(tok_dir, prediction_type)
    assert c.scheduler.config.prediction_type == prediction_type
    history = []
    pipe = LatentDiffusion(c, view_batch=1, on_stats=history.append)
    latents = keep_latents(pipe)
    res = generate(PROMPTS[0], n=1, seed=0, steps=3, scheduler=name, cfg_scale=3.0, grad_mode="unet",
                   diffusion=pipe, clip=scorer, **GUIDED)
    assert latents[0].shape == (1, 4, 8, 8) and torch.isfinite(latents[0]).all()
    assert len(history) >= 3 and all(np.isfinite(h.loss) for h in history)
    assert np.isfinite(res.images[0].clip_score)


def test_bf16_weights_guided_through_the_unet(comps, scorer, tmp_path):
    """A bf16 pipeline (what ``precision="bf16"`` loads: the weights cast; there is no autocast) guided
    through the UNet: finite fp32 latents that track the fp32 pipeline's."""
    half = load_latent_pipeline(str(save_sd_pipeline(comps, tmp_path / "sd")), dtype=torch.bfloat16)
    assert {next(m.parameters()).dtype for m in (half.unet, half.vae, half.text_encoder)} == {torch.bfloat16}
    latents = {}
    for name, c in (("bf16", half), ("fp32", comps)):
        pipe = LatentDiffusion(c)
        latents[name] = keep_latents(pipe)
        res = generate(PROMPTS[0], n=1, seed=0, steps=3, cfg_scale=3.0, grad_mode="unet", diffusion=pipe,
                       clip=scorer, **GUIDED)
        assert np.isfinite(res.images[0].clip_score)
    (got,), (ref,) = latents["bf16"], latents["fp32"]
    assert torch.isfinite(got).all() and got.dtype == torch.float32
    assert not torch.equal(got, ref)                                       # bf16 really ran
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9


def test_bad_input(comps, scorer):
    pipe = LatentDiffusion(comps)
    kw = dict(diffusion=pipe, clip=scorer, steps=1)
    with pytest.raises(InputError, match="n must be"):
        generate(PROMPTS, n=0, **kw)
    with pytest.raises(InputError, match="multiple of"):
        generate(PROMPTS, size=36, **kw)
    with pytest.raises(InputError, match="guide-target"):
        generate(PROMPTS, guide_target="xt", **kw)
    with pytest.raises(InputError, match="cfg-scale"):
        generate(PROMPTS, cfg_scale=-1.0, **kw)
    with pytest.raises(InputError, match="unknown scheduler"):
        comps.with_scheduler("heun")
    with pytest.raises(InputError):
        generate([], **kw)


def test_load_pipeline_directory_and_errors(comps, scorer, tmp_path, monkeypatch):
    save_sd_pipeline(comps, tmp_path / "sd")
    loaded = load_latent_pipeline(str(tmp_path / "sd"))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and loaded.spec == str(tmp_path / "sd")
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    for text in PROMPTS:
        a = final_latent(LatentDiffusion(comps), text, 0, steps=2, cfg_scale=2.0)
        b = final_latent(LatentDiffusion(loaded), text, 0, steps=2, cfg_scale=2.0)
        assert torch.allclose(a, b, atol=1e-5)
    assert type(load_latent_pipeline(str(tmp_path / "sd"), scheduler="lms").scheduler).__name__ == \
        "LMSDiscreteScheduler"

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    for spec, needle in [(str(tmp_path / "half"), "missing unet"), (str(tmp_path / "nope"), "no such directory"),
                         ("shapes", "pixel model")]:
        with pytest.raises(ModelLoadError, match=needle) as e:
            load_latent_pipeline(spec)
        assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_latent_pipeline("hf:someorg/some-sd")
