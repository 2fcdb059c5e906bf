"""`clipkit generate` with a Stable Diffusion pipeline directory: the latent backend behind LOADERS
(classifier-free + CLIP guidance), seeds, best-of, sidecars, bad input; tiny random models."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clipkit.cli.main import cli
from clipkit.core.errors import InputError, ModelLoadError
from clipkit.guidance.backends import DiffusionBackend, tensor_to_pil
from clipkit.guidance.diffusion import load_diffusion
from clipkit.guidance.latent import DEFAULT_CFG_SCALE, LatentDiffusion, encode_prompts, make_cfg_model
from clipkit.guidance.pipeline import generate
from clipkit.guidance.results import slugify
from clipkit.guidance.sampling import denoise_step, sample
from clipkit.guidance.schedulers import SCHEDULER_NAMES, make_scheduler
from helpers import assert_seed_fixes_the_image, make_sd_components, save_sd_pipeline   # tests/ is on sys.path (conftest.py)

PROMPT = "a red circle"
SLUG = "a-red-circle"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline directory (32x32 images, 8x8x4 latents)."""
    root = tmp_path_factory.mktemp("tiny_sd")
    return save_sd_pipeline(make_sd_components(root / "tok"), root / "sd")


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return load_diffusion(str(sd_dir), device="cpu")


@pytest.fixture(scope="module")
def scorer(tiny_openclip_dir):
    from clipkit.core.scorer import load_scorer
    return load_scorer(str(tiny_openclip_dir), device="cpu")


def pixels(im):
    return np.asarray(im)


def cfg_image(comps, seed: int, steps: int, cfg_scale: float, negative: str = ""):
    """The image of diffusers' loop written out: batch of one, the initial noise the first draw of
    ``Generator().manual_seed(seed)``, DDIM over the CFG model (``negative``: the unconditional text),
    one VAE decode, rounded to 8 bits."""
    sched = make_scheduler("ddim", comps.scheduler.config, latent=True)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    model = make_cfg_model(comps.unet, encode_prompts(comps, [PROMPT]), encode_prompts(comps, [negative]), cfg_scale)
    z = sample(denoise_step(model, sched, g), sched, (1, 4, 8, 8), steps, g, noise=noise)
    with torch.no_grad():
        return tensor_to_pil(((comps.decode(z) + 1) / 2).clamp(0, 1)[0])


def test_loader_registry_gives_the_latent_backend(pipe, sd_dir, tmp_path):
    assert isinstance(pipe, LatentDiffusion) and isinstance(pipe, DiffusionBackend)
    assert (pipe.kind, pipe.conditional, pipe.native_size, pipe.spec) == ("latent", True, 32, str(sd_dir))
    assert not any(p.requires_grad for p in pipe.components.unet.parameters())
    # a model_index.json that names StableDiffusionPipeline but has no components: one-line load error
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="missing unet") as e:
        load_diffusion(str(tmp_path))
    assert "\n" not in str(e.value)


def test_precision_casts_the_pipeline_weights(sd_dir, pipe, scorer):
    half = load_diffusion(str(sd_dir), device="cpu", precision="bf16")
    c = half.components
    assert {next(m.parameters()).dtype for m in (c.unet, c.vae, c.text_encoder)} == {torch.bfloat16}
    kw = dict(n=1, seed=2, steps=2, cfg_scale=3.0, clip=scorer)
    im = generate(PROMPT, diffusion=half, **kw).images[0]
    ref = generate(PROMPT, diffusion=pipe, **kw).images[0]
    assert math.isfinite(im.clip_score) and im.image.size == (32, 32)
    diff = np.abs(pixels(im.image).astype(int) - pixels(ref.image).astype(int))
    assert 0 < diff.mean() < 5          # bf16 really ran, and tracks fp32 (another seed differs by ~45)


def test_backend_samples_the_cfg_model_seed_by_seed(pipe, scorer):
    """Unguided, the backend's image for seed S is the CFG model's, sampled alone from seed S."""
    kw = dict(diffusion=pipe, clip=scorer, steps=3, clip_scale=0.0, n=2, seed=4)
    res = generate(PROMPT, cfg_scale=3.0, **kw)
    by_seed = {im.seed: im.image for im in res.images}
    for s in (4, 5):
        assert np.array_equal(pixels(by_seed[s]), pixels(cfg_image(pipe.components, s, 3, 3.0)))
    cond_only = {im.seed: im.image for im in generate(PROMPT, cfg_scale=1.0, **kw).images}
    assert not np.array_equal(pixels(cond_only[4]), pixels(by_seed[4]))       # the CFG scale is applied


def test_same_seed_same_image_whatever_n(pipe, scorer):
    assert_seed_fixes_the_image(generate, PROMPT, other_seed=4, diffusion=pipe, clip=scorer, steps=3, cfg_scale=5.0,
                                scheduler="euler_a")                                    # ancestral noise too


def test_clip_guidance_raises_the_guiding_score(pipe, scorer):
    kw = dict(diffusion=pipe, clip=scorer, steps=4, cfg_scale=3.0, n=3, seed=0)
    for prompt in (PROMPT, "a blue square"):
        plain = {im.seed: im.clip_score for im in generate(prompt, clip_scale=0.0, **kw).images}
        guided = {im.seed: im.clip_score for im in generate(prompt, clip_scale=1.0, **kw).images}
        gain = np.mean([guided[s] - plain[s] for s in plain])
        assert gain > 0.02, (prompt, plain, guided)


def test_default_cfg_scale_is_used_and_recorded(pipe, scorer):
    kw = dict(diffusion=pipe, clip=scorer, steps=2, n=1, seed=9)
    default = generate(PROMPT, **kw)
    explicit = generate(PROMPT, cfg_scale=DEFAULT_CFG_SCALE, **kw)
    assert default.config.cfg_scale == DEFAULT_CFG_SCALE == 7.5
    assert default.to_dict()["parameters"]["cfg_scale"] == 7.5
    assert default.models["diffusion_kind"] == "latent"
    assert np.array_equal(pixels(default.images[0].image), pixels(explicit.images[0].image))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_and_progress(pipe, scorer, name):
    calls = []
    res = generate(PROMPT, n=1, best_of=2, seed=1, steps=3, scheduler=name, diffusion=pipe, clip=scorer,
                   on_step=lambda done, total: calls.append((done, total)))
    per_image = 4 if name == "pndm" else 3                      # PLMS without PRK steps: one extra timestep
    assert calls == [(i + 1, 2 * per_image) for i in range(2 * per_image)]
    assert res.images[0].image.size == (32, 32) and math.isfinite(res.images[0].clip_score)
    assert res.to_dict()["parameters"]["guidance"]["apply"] == ("output" if name == "pndm" else "sample")


def test_api_rejects_what_the_model_cannot_take(pipe, scorer):
    for bad in [dict(size=36), dict(cfg_scale=-1.0), dict(cfg_scale=float("nan")), dict(scheduler="heun")]:
        with pytest.raises(InputError):
            generate(PROMPT, diffusion=pipe, clip=scorer, steps=2, **bad)
    res = generate(PROMPT, n=1, seed=0, steps=2, size=64, diffusion=pipe, clip=scorer)
    assert res.images[0].image.size == (64, 64)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def run(sd_dir, clip_dir, *args, quiet=False):
    return CliRunner().invoke(cli, ["-q"] * quiet + ["generate", PROMPT, "--diffusion", str(sd_dir),
                                                     "--clip", str(clip_dir), "--steps", "2", *args])


def test_cli_writes_png_and_sidecar_with_cfg_scale(sd_dir, tiny_openclip_dir, scorer, tmp_path):
    out = tmp_path / "out"
    res = run(sd_dir, tiny_openclip_dir, "--cfg-scale", "7.5", "-n", "2", "--seed", "7", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)                                  # one JSON document, nothing else
    assert "note: using the bundled" not in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{SLUG}-7.json", f"{SLUG}-7.png", f"{SLUG}-8.json",
                                                     f"{SLUG}-8.png"]
    assert doc["models"] == {"clip": str(tiny_openclip_dir), "diffusion": str(sd_dir), "diffusion_kind": "latent"}
    for im in doc["images"]:
        side = json.loads((out / f"{SLUG}-{im['seed']}.json").read_text())
        assert side["prompt"] == PROMPT and side["size"] == [32, 32] and side["models"] == doc["models"]
        p = side["parameters"]
        assert (p["cfg_scale"], p["steps"], p["n"], p["seed"], p["best_of"]) == (7.5, 2, 2, 7, 1)
        sim = float(scorer.similarity([im["path"]], [PROMPT])[0, 0])   # the score of the file as saved
        assert math.isclose(side["clip_score"], sim, abs_tol=1e-5) and im["clip_score"] == side["clip_score"]


def test_cli_same_seed_same_bytes(sd_dir, tiny_openclip_dir, tmp_path):
    from PIL import Image
    args = ("--cfg-scale", "4", "-n", "1", "--seed", "8")
    for name in ("a", "b"):
        assert run(sd_dir, tiny_openclip_dir, *args, "--out", str(tmp_path / name), quiet=True).exit_code == 0
    a, b = (tmp_path / "a" / f"{SLUG}-8.png").read_bytes(), (tmp_path / "b" / f"{SLUG}-8.png").read_bytes()
    assert a == b
    # the seed alone fixes the picture: seed 8 inside a run of seeds 7, 8 is the same image
    res = run(sd_dir, tiny_openclip_dir, "--cfg-scale", "4", "-n", "2", "--seed", "7", "--out", str(tmp_path / "c"),
              quiet=True)
    assert res.exit_code == 0, res.output
    assert np.array_equal(pixels(Image.open(tmp_path / "a" / f"{SLUG}-8.png")),
                          pixels(Image.open(tmp_path / "c" / f"{SLUG}-8.png")))
    assert not np.array_equal(pixels(Image.open(tmp_path / "c" / f"{SLUG}-7.png")),
                              pixels(Image.open(tmp_path / "c" / f"{SLUG}-8.png")))


def test_cli_best_of_keeps_the_best_candidate(sd_dir, tiny_openclip_dir, tmp_path):
    every = run(sd_dir, tiny_openclip_dir, "-n", "3", "--seed", "0", "--out", str(tmp_path / "all"), "--json")
    best = run(sd_dir, tiny_openclip_dir, "-n", "1", "--best-of", "3", "--seed", "0", "--out", str(tmp_path / "b"),
               "--json")
    assert every.exit_code == 0 and best.exit_code == 0, (every.output, best.output)
    scores = {im["seed"]: im["clip_score"] for im in json.loads(every.stdout)["images"]}
    doc = json.loads(best.stdout)
    (kept,) = doc["images"]
    assert kept["seed"] == max(scores, key=scores.get) and math.isclose(kept["clip_score"], scores[kept["seed"]],
                                                                         abs_tol=1e-6)
    assert doc["candidates"] == 3 and doc["parameters"]["best_of"] == 3
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"{SLUG}-{kept['seed']}.json",
                                                                  f"{SLUG}-{kept['seed']}.png"]


@pytest.mark.parametrize("bad", [["--cfg-scale", "-1"], ["--cfg-scale", "nan"], ["--cfg-scale", "inf"],
                                 ["--size", "36"], ["--scheduler", "heun"]])
def test_cli_bad_input_exit_2_nothing_written(sd_dir, tiny_openclip_dir, tmp_path, bad):
    out = tmp_path / "o"
    res = run(sd_dir, tiny_openclip_dir, *bad, "--out", str(out), quiet=True)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert not out.exists()


def test_latent_refuses_the_xt_target(tmp_path):
    from clipkit.guidance.config import GenerateConfig
    check = LatentDiffusion.check
    with pytest.raises(InputError, match="guide-target"):
        check(type("Fake", (), {"native_size": 32, "components": None, "spec": "x"})(),
              GenerateConfig(guide_target="xt"))


# ---------------------------------------------------------------------------------------------------
# guidance v2 controls on the latent path (issue 14)
# ---------------------------------------------------------------------------------------------------

def _render(tmp_path, name="render.png"):
    from PIL import Image
    rng = np.random.default_rng(0)
    arr = (rng.random((32, 32, 3)) * 255).astype("uint8")
    Image.fromarray(arr).save(tmp_path / name)
    return tmp_path / name


def test_negative_is_also_the_cfg_negative_prompt(pipe, scorer):
    got = generate(PROMPT, n=1, seed=3, steps=3, cfg_scale=4.0, clip_scale=0.0, negative=["blurry"],
                   diffusion=pipe, clip=scorer).images[0].image
    ref = cfg_image(pipe.components, 3, 3, 4.0, negative="blurry")
    plain = generate(PROMPT, n=1, seed=3, steps=3, cfg_scale=4.0, clip_scale=0.0, diffusion=pipe, clip=scorer)
    assert np.array_equal(pixels(got), pixels(ref))
    assert not np.array_equal(pixels(got), pixels(plain.images[0].image))


def test_init_image_runs_the_last_part_of_the_trajectory(pipe, scorer, tmp_path):
    path = _render(tmp_path)
    kw = dict(n=1, seed=3, steps=4, cfg_scale=2.0, diffusion=pipe, clip=scorer)
    seen = []
    a = generate(PROMPT, init_image=str(path), strength=0.5, on_step=lambda d, t: seen.append(t), **kw)
    b = generate(PROMPT, init_image=str(path), strength=0.5, **kw)
    c = generate(PROMPT, **kw)
    assert seen[-1] == 2 and len(seen) == 2                      # 2 of 4 steps
    assert np.array_equal(pixels(a.images[0].image), pixels(b.images[0].image))
    assert not np.array_equal(pixels(a.images[0].image), pixels(c.images[0].image))


def test_ensemble_image_prompt_drafts_and_cuts_through_the_cli(sd_dir, tiny_openclip_dir, tmp_path):
    """Every control at once on the latent path: two CLIPs (the same one twice, weighted), an image
    prompt, a negative, a cut schedule, regularisers, drafts, an init image and an aesthetic scorer."""
    from safetensors.torch import save_file
    path = _render(tmp_path)
    out = tmp_path / "o"
    head = tmp_path / "head.safetensors"                 # a LAION linear head on the tiny CLIP's 32-d embeddings
    save_file({"weight": torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), "bias": torch.zeros(1)},
              str(head))
    res = CliRunner().invoke(cli, ["-q", "generate", "a red circle:2 | a square:-1", "--diffusion", str(sd_dir),
                                   "--clip", str(tiny_openclip_dir), "--clip", str(tiny_openclip_dir),
                                   "--clip-weights", "1,0.5", "--image-prompt", f"{path}:0.5", "--negative", "dark",
                                   "--cut-schedule", "2+1,1+2", "--tv-scale", "0.1", "--sat-scale", "1",
                                   "--drafts", "2", "--draft-steps", "1", "--init-image", str(path),
                                   "--strength", "0.8", "--steps", "3", "-n", "1", "--seed", "5", "--out", str(out),
                                   "--scorer", f"aesthetic:{head}:0.2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    p = doc["parameters"]
    assert p["scorers"] == [[f"aesthetic:{head}", 0.2]] and doc["score"] == "weighted"
    assert doc["models"]["clip"] == [str(tiny_openclip_dir)] * 2 and p["clip_weights"] == [1.0, 0.5]
    assert p["image_prompts"] == [[str(path), 0.5]] and p["negative"] == ["dark"] and p["drafts"] == 2
    assert p["init_image"] == str(path) and p["strength"] == 0.8 and p["guidance"]["cut_schedule"] == [[2, 1], [1, 2]]
    (im,) = doc["images"]
    assert im["seed"] in (5, 6) and (out / f"{slugify('a red circle:2 | a square:-1')}-{im['seed']}.png").exists()
    # an image prompt alone: no PROMPT needed
    res = CliRunner().invoke(cli, ["-q", "generate", "--diffusion", str(sd_dir), "--clip", str(tiny_openclip_dir),
                                   "--image-prompt", str(path), "--steps", "2", "-n", "1", "--seed", "1",
                                   "--out", str(tmp_path / "img"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"][0]["prompt"] == ""


def test_cutouts_are_evaluated_in_chunks(pipe, scorer):
    """32 cutouts go through the CLIP in chunks of 8 views (checkpointed): the same image as one chunk."""
    kw = dict(n=1, seed=2, steps=2, cfg_scale=2.0, diffusion=pipe, clip=scorer, cutouts=28)
    a = generate(PROMPT, **kw).images[0]
    one_chunk = LatentDiffusion(pipe.components, pipe.spec, view_batch=1000)     # all 32 views at once
    b = generate(PROMPT, **{**kw, "diffusion": one_chunk}).images[0]
    assert np.abs(pixels(a.image).astype(int) - pixels(b.image).astype(int)).max() <= 1
