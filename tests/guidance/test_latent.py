"""Latent (Stable Diffusion style) pipeline: CFG + CLIP guidance through the VAE, on tiny random components."""
import pytest
import torch
import torch.nn.functional as F

from clipkit.core.objectives import ClipTarget

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.core.losses import spherical_dist
from clipkit.guidance.latent import encode_prompts, generate_latent, load_latent_pipeline, make_cfg_model
from clipkit.guidance.schedulers import SCHEDULER_NAMES, make_scheduler
from clipkit.guidance.parametrisation import abar_at
from clipkit.guidance.sampling import denoise_step, sample
from clipkit.guidance.wrapper import GuidanceConfig, GuidedDenoiser, make_views
from helpers import make_sd_components, save_sd_pipeline   # tests/ is on sys.path (conftest.py)

PROMPTS = ["a red circle", "a blue square"]


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


def test_cfg_batch_of_prompts_shapes_and_per_prompt_alignment(comps, scorer):
    r = generate_latent(comps, PROMPTS, n_per_prompt=2, steps=4, cfg_scale=5.0, scorer=scorer, seed=0,
                        negative_prompt=["blurry", "dark"])
    assert r.latents.shape == (4, 4, 8, 8) and r.pixels.shape == (4, 3, 32, 32)
    assert [im.size for im in r.images] == [(32, 32)] * 4
    assert r.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert r.clip_scores.shape == (4,) and r.clip_scores.dtype == torch.float32
    assert not torch.equal(r.latents[0], r.latents[1])                 # different noise per image
    # each image's unconditional row belongs to its own prompt: prompt 2 alone, same noise -> same latents
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    both = generate_latent(comps, PROMPTS, 2, steps=3, cfg_scale=5.0, negative_prompt=["blurry", "dark"], noise=noise)
    alone = generate_latent(comps, PROMPTS[1:], 2, steps=3, cfg_scale=5.0, negative_prompt="dark", noise=noise[2:])
    assert torch.allclose(both.latents[2:], alone.latents, atol=1e-4, rtol=1e-4)
    swapped = generate_latent(comps, PROMPTS[1:], 2, steps=3, cfg_scale=5.0, negative_prompt="blurry",
                              noise=noise[2:])
    assert (both.latents[2:] - swapped.latents).abs().max() > 1e-2      # the negative prompt matters
    assert "cfg_scale" in r.to_json() and r.config.negative_prompts == ["blurry", "dark"]


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
    # the generate path at cfg_scale 1 is the plain conditional sampler
    r = generate_latent(comps, PROMPTS, 1, steps=4, cfg_scale=1.0, seed=3)
    sched = make_scheduler("ddim", comps.scheduler.config, latent=True)
    g = torch.Generator().manual_seed(3)
    ref = sample(denoise_step(lambda x, t: comps.unet(x, t, encoder_hidden_states=cond).sample, sched, g), sched,
                 (2, 4, 8, 8), 4, g)
    assert torch.allclose(r.latents, ref, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clip_guidance_raises_the_guiding_clip_similarity(tok_dir, scorer, prediction_type):
    comps = make_sd_components(tok_dir, prediction_type)
    kw = dict(prompts=PROMPTS, n_per_prompt=1, steps=4, cfg_scale=3.0, scorer=scorer, seed=0)
    base = generate_latent(comps, **kw)
    guided = generate_latent(comps, guidance=guided_cfg(), **kw)
    assert len(guided.history) == 4 and guided.config.prediction_type == prediction_type
    assert ((guided.clip_scores - base.clip_scores) > 0.02).all(), (base.clip_scores, guided.clip_scores)
    # guiding towards the other prompt helps that prompt, not this one: the gain is prompt-specific
    other = generate_latent(comps, **{**kw, "prompts": PROMPTS[::-1]}, guidance=guided_cfg())
    mine = (scorer.encode_images(other.images) * scorer.text_embeddings(PROMPTS)).sum(-1)
    assert (guided.clip_scores > mine).all()


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
    try:
        cfg = guided_cfg(views=3, cutouts=1, grad_mode="unet")
        r = generate_latent(comps, PROMPTS, 1, steps=3, cfg_scale=4.0, guidance=cfg, scorer=scorer, seed=0,
                            view_batch=2)
    finally:
        for h in handles:
            h.remove()
    assert len(r.history) == 3
    assert calls["unet"] == 3                      # one batched [uncond; cond] pass per step, reused
    assert calls["decoder"] == 3 + 1               # one decode per guided step + the final decode
    assert calls["decoder_bwd"] == 3               # one VJP through the VAE per step
    # 2 images x 4 views in chunks of 2 views -> 2 CLIP forwards per step, each run again by
    # checkpointing in the backward pass; + 1 final scoring pass
    assert calls["clip"] == 3 * 2 * 2 + 1
    for m in (comps.unet, comps.vae, comps.text_encoder, scorer.backend.module):
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    # chunking changes memory, not the result
    same = generate_latent(comps, PROMPTS, 1, steps=3, cfg_scale=4.0, guidance=cfg, scorer=scorer, seed=0,
                           view_batch=0)
    assert torch.allclose(same.latents, r.latents, atol=1e-4, rtol=1e-4)


def test_same_seed_same_output(comps, scorer):
    c = comps.with_scheduler("euler_a")                                   # ancestral: noise every step
    kw = dict(prompts=PROMPTS, n_per_prompt=2, steps=3, cfg_scale=3.0, scorer=scorer,
              guidance=guided_cfg(cutouts=1, view_noise=0.1))
    a = generate_latent(c, seed=11, **kw)
    b = generate_latent(c, generator=torch.Generator().manual_seed(11), **kw)
    other = generate_latent(c, seed=12, **kw)
    assert torch.equal(a.latents, b.latents)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert not torch.equal(a.latents, other.latents)
    assert a.config.seed == 11 and b.config.seed is None


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_scheduler_runs_guided(tok_dir, comps, scorer, name, prediction_type):
    c = comps if prediction_type == "epsilon" else make_sd_components(tok_dir, prediction_type)
    c = c.with_scheduler(name)
    assert c.scheduler.config.prediction_type == prediction_type
    r = generate_latent(c, PROMPTS, 1, steps=3, cfg_scale=3.0, guidance=guided_cfg(grad_mode="unet"),
                        scorer=scorer, seed=0, view_batch=1)
    assert r.latents.shape == (2, 4, 8, 8) and torch.isfinite(r.latents).all()
    assert len(r.history) >= 3 and all(torch.isfinite(torch.tensor(h.loss)) for h in r.history)
    assert torch.isfinite(r.clip_scores).all()


def test_bf16_autocast_on_cpu(comps, scorer):
    r = generate_latent(comps, PROMPTS, 1, steps=3, cfg_scale=3.0, guidance=guided_cfg(grad_mode="unet"),
                        scorer=scorer, seed=0, precision="bf16")
    ref = generate_latent(comps, PROMPTS, 1, steps=3, cfg_scale=3.0, guidance=guided_cfg(grad_mode="unet"),
                          scorer=scorer, seed=0)
    assert torch.isfinite(r.latents).all() and r.latents.dtype == torch.float32
    assert r.clip_scores.dtype == torch.float32 and r.config.precision == "bf16"
    assert not torch.equal(r.latents, ref.latents)                        # autocast really ran
    assert F.cosine_similarity(r.latents.flatten(), ref.latents.flatten(), dim=0) > 0.9


def test_bad_input(comps, scorer):
    with pytest.raises(InputError, match="n_per_prompt"):
        generate_latent(comps, PROMPTS, 0)
    with pytest.raises(InputError, match="multiples of"):
        generate_latent(comps, PROMPTS, height=36)
    with pytest.raises(InputError, match="negative_prompt"):
        generate_latent(comps, PROMPTS, negative_prompt=["a", "b", "c"])
    with pytest.raises(InputError, match="scorer"):
        generate_latent(comps, PROMPTS, guidance=GuidanceConfig())
    with pytest.raises(InputError, match="precision"):
        generate_latent(comps, PROMPTS, precision="fp8")
    with pytest.raises(InputError, match="noise"):
        generate_latent(comps, PROMPTS, steps=1, noise=torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="unknown scheduler"):
        comps.with_scheduler("heun")
    with pytest.raises(InputError):
        generate_latent(comps, [])


def test_load_pipeline_directory_and_errors(comps, scorer, tmp_path, monkeypatch):
    save_sd_pipeline(comps, tmp_path / "sd")
    loaded = load_latent_pipeline(str(tmp_path / "sd"))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and loaded.spec == str(tmp_path / "sd")
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    a = generate_latent(comps, PROMPTS, 1, steps=2, cfg_scale=2.0, seed=0)
    b = generate_latent(loaded, PROMPTS, 1, steps=2, cfg_scale=2.0, seed=0)
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
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
