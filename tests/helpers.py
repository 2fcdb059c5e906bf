"""Tiny random CLIP models built from configs under a fixed seed (never a hub id)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711],
                   "interpolation": "bicubic", "resize_mode": "shortest"}


def make_openclip_dir(path: Path, seed: int = 0) -> Path:
    from clipkit.core.artifacts import build_openclip, save_openclip_dir
    torch.manual_seed(seed)
    model = build_openclip(TINY_OPENCLIP_CFG)
    return save_openclip_dir(model, TINY_OPENCLIP_CFG, TINY_PREPROCESS, path)


def write_clip_tokenizer_files(path: Path) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, derived from the CLIP BPE file
    that ships inside the open_clip wheel (so the real tokenizer works offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    # open_clip names the specials <start_of_text>/<end_of_text>; transformers expects OpenAI's names.
    rename = {tok.decoder[tok.sot_token_id]: "<|startoftext|>", tok.decoder[tok.eot_token_id]: "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    (path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")


def make_hf_clip_dir(path: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                     processor: bool = True, tokenizer_from: Path | None = None) -> Path:
    """A tiny transformers CLIPModel + CLIPTokenizer directory; ``processor``: also a
    preprocessor_config.json (shortest edge = crop = 32, bicubic, OpenAI mean/std);
    ``tokenizer_from``: copy the tokenizer files of that directory instead of building them."""
    import shutil

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        projection_dim=32)
    CLIPModel(cfg).save_pretrained(path)
    if tokenizer_from is not None:
        for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_from) / f).is_file():
                shutil.copy(Path(tokenizer_from) / f, path / f)
    else:
        write_clip_tokenizer_files(path)
        CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    if not processor:
        return path
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor"}))
    return path


def sd_scheduler_config(prediction_type: str = "epsilon"):
    """The noise schedule of Stable Diffusion 1.x (scaled linear betas, PNDM without PRK steps)."""
    from diffusers import PNDMScheduler
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type).config


def make_sd_components(tok_dir: Path, prediction_type: str = "epsilon", scheduler: str = "ddim", seed: int = 0):
    """A tiny random Stable Diffusion pipeline (UNet2DConditionModel 8x8 latents, AutoencoderKL x4,
    CLIPTextModel) as :class:`~clipkit.guidance.latent.LatentComponents`: 32x32 images.
    ``tok_dir``: where the CLIP tokenizer files are (written there if missing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from clipkit.guidance.latent import LatentComponents
    from clipkit.guidance.schedulers import make_scheduler
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    tok_dir.mkdir(parents=True, exist_ok=True)
    if not (tok_dir / "vocab.json").is_file():
        write_clip_tokenizer_files(tok_dir)
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    sched = make_scheduler(scheduler, sd_scheduler_config(prediction_type), latent=True)
    return LatentComponents(unet, vae, text, tok, sched)


def save_sd_pipeline(comps, path: Path) -> Path:
    """Save LatentComponents as a diffusers StableDiffusionPipeline directory (no safety checker)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=comps.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def assert_seed_fixes_the_image(generate, prompt, other_seed: int, **kw):
    """``generate(prompt, n=, seed=, **kw)``: seed 5 gives the same 32x32 RGB image twice, and the same
    image (and score) inside a run of seeds 3-5; ``other_seed`` gives another image."""
    import math

    import numpy as np
    a = generate(prompt, n=1, seed=5, **kw).images[0]
    b = generate(prompt, n=1, seed=5, **kw).images[0]
    batch = {im.seed: im for im in generate(prompt, n=3, seed=3, **kw).images}
    assert a.seed == 5 and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert sorted(batch) == [3, 4, 5]
    # a seed fixes its image alone: the same picture inside a run of 3 (so -n 1 --seed S regenerates it)
    assert np.array_equal(np.asarray(batch[5].image), np.asarray(a.image))
    assert math.isclose(batch[5].clip_score, a.clip_score, abs_tol=1e-6)
    assert not np.array_equal(np.asarray(batch[other_seed].image), np.asarray(a.image))
    assert a.image.size == (32, 32) and a.image.mode == "RGB"


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def make_colour_folder(root: Path, per_class: dict | None = None, size: int = 32, seed: int = 0) -> Path:
    """A labelled ImageFolder of coloured discs on black (the Shapes CLIP reads their colour):
    ``root/<split>/<colour>/<n>.png``, ``per_class`` = {split: images per class} (default
    train 4, val 2, test 3); ``{"": n}`` writes ``root/<colour>/...`` without splits."""
    import random

    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    for split, n in (per_class or {"train": 4, "val": 2, "test": 3}).items():
        for name, rgb in COLOURS.items():
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = Image.new("RGB", (size, size))
                r = rng.randint(size // 5, size // 3)
                cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
                ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
                im.save(d / f"{i}.png")
    return root


TINY_GPT = dict(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)


def tiny_clipcap(mapper="mlp", seed=0, **kw):
    """A tiny random ClipCap (16-d CLIP embeddings, prefix 4, 2-layer GPT-2 with EOS = 0), in eval mode."""
    import torch

    from clipkit.captioning.model import CaptionerConfig, ClipCapModel
    torch.manual_seed(seed)
    cfg = CaptionerConfig(mapper=mapper, clip_dim=16, prefix_length=4, clip_length=3, mapper_layers=2,
                          mapper_heads=4, decoder=dict(TINY_GPT), **kw)
    return ClipCapModel(cfg).eval()


RERANK_BAD = {"zero.png", "text.jpg", "trunc.jpg", "bomb.png"}     # the bad files of ``rerank_folder``


# ---- Shapes pictures for the search tests (folders, a shared corpus: tests/conftest.py) ----------------
COLORS = ("red", "green", "blue", "yellow")


def render(scenes, size=64):
    from clipkit.shapes.data import render_pil
    return render_pil(scenes, size)


def scene(shape, color, position="center", size="large"):
    from clipkit.shapes.world import Scene, ShapeObject
    return Scene((ShapeObject(shape, color, size, position),))


def make_images(folder, n_red=4, n_other=8):
    """Red circles at varied positions + other colours/shapes; two byte-identical files (a tie)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    pos = ["top left", "top right", "bottom left", "bottom right", "center", "left", "right", "top"]
    scenes = [scene("circle", "red", pos[i % 8]) for i in range(n_red)]
    scenes += [scene(("square", "triangle")[i % 2], COLORS[1 + i % 3], pos[i % 8]) for i in range(n_other)]
    paths = []
    for i, im in enumerate(render(scenes)):
        p = folder / ("sub" if i % 3 == 2 else ".") / f"img{i:02d}.png"
        im.save(p)
        paths.append(p)
    return paths


# ---- tiny open_clip config of the CLIP training tests (tests/conftest.py: tiny_init) ---------------------
TINY_TRAIN_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 24, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TINY_TRAIN_PP = {"size": 24, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
           "interpolation": "bicubic", "resize_mode": "shortest"}


def shapes_caption_folder(folder, n=6):
    """``n`` one-object Shapes renders + captions.jsonl (3 captions each, then a broken line, a
    missing image and an empty caption); returns the jsonl path."""
    import json
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import canonical_caption, captions, sample_scene
    scenes = [sample_scene(i, n_objects=1) for i in range(n)]
    lines = []
    for i, (sc, im) in enumerate(zip(scenes, render_pil(scenes, 32))):
        im.save(folder / f"img{i}.png")
        for c in [canonical_caption(sc)] + captions(sc)["full"][1:3]:
            lines.append(json.dumps({"image": f"img{i}.png", "caption": c}))
    lines += ["{broken json", json.dumps({"image": "missing.png", "caption": "x"}),
              json.dumps({"image": "img0.png", "caption": "  "})]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl"


def assert_one_line_error(res, text: str) -> None:
    """A CliRunner result that failed as the CLI promises: exit 2, one line ``Error: ...`` holding ``text``."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], res.output
