"""Scoring conformance: clipkit against the reference libraries' own public code paths.

Every expected value comes from transformers (``CLIPProcessor.from_pretrained`` +
``CLIPModel.get_image_features/get_text_features``, or ``CLIPImageProcessor`` for pixels) or from
open_clip (``create_model_and_transforms("local-dir:...")`` + its transform + ``get_tokenizer``,
``build_zero_shot_classifier``), never from clipkit code. Tiny random models built from configs,
fp32 on CPU; tolerance 1e-5 (embedding components and image-text cosines).

Documented exceptions -- loader differences (``clipkit.core.io.load_image`` decodes every image to
RGB before preprocessing, compositing transparency on white like transformers does):

* open_clip resizes an image *in its own mode* and converts it to RGB only afterwards
  (``MaybeConvertMode`` comes after ``Resize``/``CenterCrop``): a palette image is resampled
  nearest-neighbour (PIL resizes mode P that way), RGBA keeps its hidden colours and loses the alpha
  (no compositing), CMYK is converted after resampling. For P, RGBA and CMYK the open_clip
  reference is therefore fed the image as PIL converts it to RGB (``convert("RGB")``; alpha
  composited on white); the raw-image differences are printed, not asserted.
* Not in the zoo: EXIF orientation (clipkit applies it, neither reference does), 16-bit and float
  greyscale (clipkit rescales, PIL's ``convert("RGB")`` clips), and L/RGB images carrying a tRNS
  transparency key (transformers composites them on white; clipkit ignores the key).

Run ``pytest -q -s tests/conformance`` to see the measured differences (lines ``CONFORMANCE | ...``).
"""
from __future__ import annotations

import functools
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipkit.core.errors import ModelLoadError

TOL = 1e-5
TEXTS = ["a photo of an astronaut", "a grey cat sleeping on a sofa", "a red circle on a white background",
         "two rockets and a cup of coffee on a wooden table, photographed from above in the evening"]
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def report(row: str, reference: str, diff: float) -> None:
    print(f"\nCONFORMANCE | {row} | {reference} | {diff:.1e}")


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (the vector is pooler_output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --------------------------------------------------------------------------------------------
# image zoo
# --------------------------------------------------------------------------------------------

def _rgb(w: int, h: int, seed: int) -> Image.Image:
    """A photograph (shipped inside scikit-image) resized to w x h, plus a little noise."""
    from skimage import data
    base = Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC)
    rng = np.random.default_rng(seed)
    arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def zoo(scale: int = 1) -> dict[str, Image.Image]:
    return dict(_zoo(scale))


@functools.lru_cache(maxsize=None)
def _zoo(scale: int) -> tuple[tuple[str, Image.Image], ...]:
    """Odd and even crop offsets, portrait and landscape, up- and downscaling, and the image modes
    grey (L), palette (P, with and without transparency), RGBA, CMYK. ``scale`` multiplies sizes."""
    s = scale
    z = {
        f"RGB landscape {57 * s}x{41 * s}": _rgb(57 * s, 41 * s, 0),
        f"RGB portrait {41 * s}x{61 * s}": _rgb(41 * s, 61 * s, 1),
        f"RGB landscape {60 * s}x{40 * s}": _rgb(60 * s, 40 * s, 2),
        f"RGB portrait {32 * s}x{51 * s}": _rgb(32 * s, 51 * s, 3),
        f"RGB square {45 * s}x{45 * s}": _rgb(45 * s, 45 * s, 4),
        f"RGB small {27 * s // 2}x{20 * s // 2}": _rgb(27 * s // 2, 20 * s // 2, 5),
    }
    base = _rgb(57 * s, 41 * s, 6)
    w, h = base.size
    z["L grey"] = base.convert("L")
    z["P palette"] = base.quantize(48)
    pt = base.quantize(48)
    pt.info["transparency"] = 3
    z["P palette + transparency"] = pt
    rng = np.random.default_rng(7)
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    hidden = np.where(alpha[..., None] == 0, rng.integers(0, 256, (h, w, 3)), np.asarray(base)).astype(np.uint8)
    z["RGBA alpha 0..255"] = Image.frombytes("RGBA", (w, h), np.dstack([hidden, alpha]).tobytes())
    rgb = np.asarray(base, dtype=np.int16)
    k = np.tile(np.linspace(0, 160, h).round().astype(np.int16)[:, None], (1, w))
    cmyk = np.dstack([255 - rgb, k]).clip(0, 255).astype(np.uint8)
    z["CMYK"] = Image.frombytes("CMYK", (w, h), cmyk.tobytes())
    return tuple(z.items())


# --------------------------------------------------------------------------------------------
# vs transformers
# --------------------------------------------------------------------------------------------

def _ip(**kw):
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(**kw)


def _write_hub_b32(d, base):
    # openai/clip-vit-base-patch32's preprocessor_config.json, verbatim (legacy int sizes)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": OPENAI_MEAN,
        "image_std": OPENAI_STD, "resample": 3, "size": 224}))


def _write_processor_only(d, base):
    from transformers import CLIPProcessor, CLIPTokenizer
    ip = _ip(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
             image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    CLIPProcessor(image_processor=ip, tokenizer=CLIPTokenizer.from_pretrained(base)).save_pretrained(d)
    assert (d / "processor_config.json").is_file() and not (d / "preprocessor_config.json").exists()


def _write_both(d, base):
    """processor_config.json and a stale preprocessor_config.json: transformers reads the nested one."""
    _write_processor_only(d, base)
    _ip(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    assert (d / "preprocessor_config.json").is_file()


HF_CASES = {   # name: (vision image size, zoo scale, writer)
    "hub openai/clip-vit-base-patch32 config (224, bicubic)": (224, 5, _write_hub_b32),
    "shortest_edge 40, crop 32": (32, 1, lambda d, b: _ip(size={"shortest_edge": 40},
                                                         crop_size={"height": 32, "width": 32}).save_pretrained(d)),
    "shortest_edge 32, mean/std 0.5, bilinear": (32, 1, lambda d, b: _ip(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, resample=2).save_pretrained(d)),
    "processor_config.json only (CLIPProcessor.save_pretrained)": (32, 1, _write_processor_only),
    "processor_config.json beside a stale preprocessor_config.json": (32, 1, _write_both),
    "height/width 32x32, no crop": (32, 1, lambda d, b: _ip(size={"height": 32, "width": 32},
                                                            do_center_crop=False).save_pretrained(d)),
}


@pytest.fixture(scope="module")
def hf_bases(tmp_path_factory, tiny_hf_dir):
    """The session's tiny transformers CLIP (32 px) without its processor file, and a 224 px one
    (ViT-B/32 geometry) sharing its tokenizer."""
    from helpers import make_hf_clip_dir
    root = tmp_path_factory.mktemp("conf_hf")
    base32 = root / "base32"
    shutil.copytree(tiny_hf_dir, base32, ignore=shutil.ignore_patterns("*processor_config.json"))
    base224 = make_hf_clip_dir(root / "base224", image_size=224, patch_size=32, processor=False,
                               tokenizer_from=tiny_hf_dir)
    return {32: base32, 224: base224, "root": root}


def _hf_case_dir(hf_bases, name: str, writer, size: int):
    d = hf_bases["root"] / f"case{list(HF_CASES).index(name)}"
    if not d.exists():
        shutil.copytree(hf_bases[size], d)
        writer(d, hf_bases[size])
    return d


def _reference_hf(d, images, texts):
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(d).eval()
    proc = CLIPProcessor.from_pretrained(d)
    with torch.no_grad():
        img = torch.cat([_features(model.get_image_features(**proc(images=im, return_tensors="pt")))
                         for im in images])
        txt = _features(model.get_text_features(**proc(text=texts, return_tensors="pt", padding=True)))
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_scores_match_transformers(case, hf_bases):
    from clipkit.core.scorer import load_scorer
    size, scale, writer = HF_CASES[case]
    d = _hf_case_dir(hf_bases, case, writer, size)
    ims = zoo(scale)
    ref_img, ref_txt = _reference_hf(d, list(ims.values()), TEXTS)
    sc = load_scorer(str(d), device="cpu")
    img, txt = sc.encode_images(list(ims.values())), sc.encode_texts(TEXTS)
    assert torch.allclose(txt, ref_txt, atol=TOL, rtol=0)
    cos_diff = (img @ txt.T - ref_img @ ref_txt.T).abs()
    emb_diff = (img - ref_img).abs().amax(dim=1)
    for i, name in enumerate(ims):
        assert float(cos_diff[i].max()) <= TOL and float(emb_diff[i]) <= TOL, (case, name)
    report(f"transformers dir: {case} (zoo of {len(ims)}; text max {float((txt - ref_txt).abs().max()):.0e})",
           "CLIPProcessor + CLIPModel.get_*_features", float(cos_diff.max()))


# Pixel level, no model: geometry the tiny 32 px model cannot take (non-square crops, other sizes).
PIXEL_CASES = {
    "non-square crop 20x24": {"size": {"shortest_edge": 40}, "crop_size": {"height": 20, "width": 24}},
    "zero padding (shortest 24, crop 32)": {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 32}},
    "height/width 30x50 then crop 28": {"size": {"height": 30, "width": 50}, "crop_size": {"height": 28, "width": 28}},
    "height/width 30x50, no crop": {"size": {"height": 30, "width": 50}, "do_center_crop": False},
    "no resize, crop 32": {"do_resize": False, "crop_size": {"height": 32, "width": 32}},
    "nearest (resample 0)": {"size": {"shortest_edge": 33}, "crop_size": {"height": 32, "width": 32}, "resample": 0},
    "no rescale, 0..255 mean/std": {"size": {"shortest_edge": 40}, "crop_size": 32, "do_rescale": False,
                                    "image_mean": [120.0, 110.0, 100.0], "image_std": [60.0, 62.0, 64.0]},
    "no normalize": {"size": {"shortest_edge": 40}, "crop_size": 32, "do_normalize": False},
    "rescale 1/127.5, mean/std 1": {"size": {"shortest_edge": 40}, "crop_size": 32, "rescale_factor": 1 / 127.5,
                                    "image_mean": 1.0, "image_std": 1.0},
    "legacy int sizes": {"size": 40, "crop_size": 32},
    "default_to_square int size": {"size": 36, "default_to_square": True, "crop_size": 32},
    "use_square_size (KOSMOS-2 compatibility)": {"size": {"shortest_edge": 40}, "use_square_size": True,
                                                 "crop_size": 224},
}


@pytest.mark.parametrize("case", list(PIXEL_CASES))
def test_pixels_match_clip_image_processor(case):
    from transformers import CLIPImageProcessor

    from clipkit.core.io import load_image
    from clipkit.core.preprocess import from_hf_image_processor, pil_to_tensor
    d = PIXEL_CASES[case]
    ref_proc = CLIPImageProcessor.from_dict(dict(d))
    cfg = from_hf_image_processor(dict(d))
    worst = 0.0
    for name, im in zoo().items():
        ref = ref_proc(images=im, return_tensors="pt")["pixel_values"][0]
        ours = pil_to_tensor(load_image(im), cfg)
        assert ours.shape == ref.shape, (case, name)
        diff = float((ours - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        assert diff <= TOL, (case, name)
        worst = max(worst, diff)
    report(f"pixels: {case}", "CLIPImageProcessor", worst)


@pytest.mark.parametrize("case", ["nearest (resample 0)", "non-square crop 20x24", "zero padding (shortest 24, crop 32)",
                                  "height/width 30x50, no crop", "no resize, crop 32"])
def test_differentiable_path_has_the_reference_geometry(case):
    """With nearest resampling the float path must reproduce CLIPImageProcessor exactly (sizes, crop
    offsets, padding); other resamplers only add uint8 rounding (checked in tests/core/test_scorer.py)."""
    from transformers import CLIPImageProcessor

    from clipkit.core.preprocess import from_hf_image_processor, torch_preprocess
    d = {**PIXEL_CASES[case], "resample": 0}
    ref_proc = CLIPImageProcessor.from_dict(dict(d))
    cfg = from_hf_image_processor(dict(d))
    for name, im in zoo().items():
        if im.mode != "RGB":
            continue
        ref = ref_proc(images=im, return_tensors="pt")["pixel_values"][0]
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].double() / 255
        ours = torch_preprocess(x, cfg)[0]
        assert ours.shape == ref.shape and float((ours - ref).abs().max()) <= TOL, (case, name)


@pytest.mark.parametrize("bad,needle", [
    ({"do_pad": True}, "do_pad"),
    ({"resample": 1}, "LANCZOS"),
    ({"size": {"longest_edge": 40}}, "size"),
    ({"size": {"shortest_edge": 32, "longest_edge": 64}}, "size"),
    ({"image_processor_type": "ViTImageProcessor"}, "ViTImageProcessor"),
    ({"size": {"shortest_edge": 40}, "crop_size": {"height": 40, "width": 40}}, "gives 40x40 pixels"),
    ({"size": {"shortest_edge": 32}, "do_center_crop": False}, "input size would depend on the image"),
])
def test_unsupported_processor_settings_are_one_line_load_errors(bad, needle, hf_bases, tmp_path):
    from clipkit.core.registry import load_clip
    d = tmp_path / "bad"
    shutil.copytree(hf_bases[32], d)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, **bad}))
    with pytest.raises(ModelLoadError) as e:
        load_clip(str(d))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_no_processor_config_warns_and_uses_clip_image_processor_defaults(hf_bases, caplog):
    from transformers import CLIPImageProcessor

    from clipkit.core.preprocess import pil_to_tensor
    from clipkit.core.registry import load_clip
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        be = load_clip(str(hf_bases[32]))
    assert any("no processor_config.json" in r.message for r in caplog.records)
    ref_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    im = zoo()["RGB landscape 57x41"]
    ref = ref_proc(images=im, return_tensors="pt")["pixel_values"][0]
    assert float((pil_to_tensor(im, be.preprocess) - ref).abs().max()) <= TOL


# --------------------------------------------------------------------------------------------
# vs open_clip
# --------------------------------------------------------------------------------------------

OPENCLIP_LOADER_EXCEPTIONS = ("P palette", "P palette + transparency", "RGBA alpha 0..255", "CMYK")

OC_CASES = {
    "bicubic, shortest 32 (tests/helpers TINY_PREPROCESS)": {},
    "bilinear, mean/std 0.5": {"interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
    "squash": {"resize_mode": "squash"},
}


def _as_rgb_like_pil(im: Image.Image) -> Image.Image:
    """The image as PIL converts it to RGB, transparency composited on white (the loader step)."""
    if "A" in im.getbands() or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


@pytest.fixture(scope="module")
def oc_dirs(tmp_path_factory):
    from helpers import TINY_OPENCLIP_CFG, TINY_PREPROCESS

    from clipkit.core.artifacts import build_openclip, save_openclip_dir
    root = tmp_path_factory.mktemp("conf_oc")
    out = {}
    for i, (name, over) in enumerate(OC_CASES.items()):
        torch.manual_seed(0)
        out[name] = save_openclip_dir(build_openclip(TINY_OPENCLIP_CFG), TINY_OPENCLIP_CFG,
                                      {**TINY_PREPROCESS, **over}, root / f"oc{i}")
    return out


def _reference_oc(d):
    import open_clip
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{d}")
    return model.eval(), transform, open_clip.get_tokenizer(f"local-dir:{d}")


@pytest.mark.parametrize("case", list(OC_CASES))
def test_scores_match_open_clip(case, oc_dirs):
    from clipkit.core.scorer import load_scorer
    d = oc_dirs[case]
    model, transform, tok = _reference_oc(d)
    ims = zoo()
    sc = load_scorer(str(d), device="cpu")
    img, txt = sc.encode_images(list(ims.values())), sc.encode_texts(TEXTS)
    with torch.no_grad():
        ref_txt = F.normalize(model.encode_text(tok(TEXTS)), dim=-1)
        raw = F.normalize(model.encode_image(torch.stack([transform(im) for im in ims.values()])), dim=-1)
        ref_img = F.normalize(model.encode_image(torch.stack([
            transform(_as_rgb_like_pil(im)) if name in OPENCLIP_LOADER_EXCEPTIONS else transform(im)
            for name, im in ims.items()])), dim=-1)
    assert torch.allclose(txt, ref_txt, atol=TOL, rtol=0)
    cos_diff = (img @ txt.T - ref_img @ ref_txt.T).abs()
    for i, name in enumerate(ims):
        assert float(cos_diff[i].max()) <= TOL and float((img[i] - ref_img[i]).abs().max()) <= TOL, (case, name)
    report(f"open_clip dir: {case} (zoo of {len(ims)})", "create_model_and_transforms + transform + get_tokenizer",
           float(cos_diff.max()))
    raw_diff = (img @ txt.T - raw @ ref_txt.T).abs()
    for i, name in enumerate(ims):
        if name in OPENCLIP_LOADER_EXCEPTIONS:
            report(f"open_clip dir: {case}, {name} as open_clip decodes it (documented loader difference)",
                   "open_clip transform on the raw image", float(raw_diff[i].max()))
        else:
            assert float(raw_diff[i].max()) <= TOL, (case, name)


def test_open_clip_differentiable_path_crops_like_open_clip(oc_dirs):
    """No resize needed (short side = 32): the float path must give open_clip's crop (rounded offset)."""
    from clipkit.core.preprocess import torch_preprocess
    from clipkit.core.scorer import load_scorer
    d = oc_dirs["bicubic, shortest 32 (tests/helpers TINY_PREPROCESS)"]
    _, transform, _ = _reference_oc(d)
    sc = load_scorer(str(d), device="cpu")
    for w, h in ((51, 32), (32, 53), (32, 32)):
        im = _rgb(w, h, 9)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
        assert float((torch_preprocess(x, sc.preprocess)[0] - transform(im)).abs().max()) <= TOL


@pytest.mark.parametrize("templates", ["simple", "openai"])
def test_zero_shot_classifier_matches_open_clip(templates, oc_dirs):
    from open_clip import zero_shot_metadata as zsm
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from clipkit.core.prompts import build_classifier, classify
    from clipkit.core.scorer import load_scorer
    d = oc_dirs["bicubic, shortest 32 (tests/helpers TINY_PREPROCESS)"]
    model, transform, tok = _reference_oc(d)
    labels = ["astronaut", "cat", "rocket", "cup of coffee", "red circle"]
    tmpl = {"simple": zsm.SIMPLE_IMAGENET_TEMPLATES, "openai": zsm.OPENAI_IMAGENET_TEMPLATES}[templates]
    ref_w = build_zero_shot_classifier(model, tok, labels, tmpl, num_classes_per_batch=2, device="cpu")   # [D, L]
    sc = load_scorer(str(d), device="cpu")
    ours = build_classifier(sc, labels, templates)                                                         # [L, D]
    w_diff = float((ours - ref_w.T).abs().max())
    assert w_diff <= TOL
    ims = [im for name, im in zoo().items() if im.mode == "RGB"]
    with torch.no_grad():
        ref_sim = F.normalize(model.encode_image(torch.stack([transform(im) for im in ims])), dim=-1) @ ref_w
    sim_diff = float((classify(ims, labels, templates, scorer=sc).similarity - ref_sim).abs().max())
    assert sim_diff <= TOL
    report(f"zero-shot: {templates} templates ({len(tmpl)}) x {len(labels)} labels, class weights / image cosines",
           "open_clip build_zero_shot_classifier", max(w_diff, sim_diff))
