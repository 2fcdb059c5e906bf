"""The recipes of the bundled Shapes models: the Shapes data and evaluations that the generic trainers
of core and the plugins are given (core never imports the Shapes world; DESIGN §1).

* CLIP (:func:`train_clip`): scene parameters rendered on the device at a random size per batch,
  zero-shot attribute accuracy on validation renders (:func:`shapes_clip_data`);
* DDPM (:func:`train_diffusion`): Shapes renders as x0, samples judged by the oracle
  (:func:`shapes_diffusion_data`, :func:`judge_samples`);
* ClipCap (:func:`train_captioner`): CLIP embeddings of rendered scenes with their describing
  captions, and the oracle's exact-attribute rate of greedy captions (:func:`shapes_caption_data`).

Each ``train_*`` here runs the generic trainer with the Shapes data when ``cfg.data == "shapes"``
(the diffusion trainer always), and with its own data otherwise; ``clipkit train`` calls these.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipkit.captioning.train import CaptionData, CaptionSplits, embed_images
from clipkit.core.preprocess import torch_preprocess
from clipkit.core.train_clip import ClipData
from clipkit.guidance.train_diffusion import DiffusionData
from clipkit.shapes.data import ShapesCaptions, collate, single_object_scenes
from clipkit.shapes.oracle import read_attributes
from clipkit.shapes.parse import caption_matches, describing_captions
from clipkit.shapes.probes import reference_accuracy, zero_shot_accuracy
from clipkit.shapes.render import random_params, render, render_scenes
from clipkit.shapes.world import sample_scene, split_seed

# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def shapes_clip_eval(model, preprocess, tokenizer, device, n: int = 512) -> dict:
    """Zero-shot accuracy of each attribute (colour, shape, size, position) on ``n`` one-object
    validation renders, with the model being trained."""
    scenes = single_object_scenes("val", n)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = render_scenes(scenes, preprocess.image_size, device=device)
        img = F.normalize(model.encode_image(torch_preprocess(x, preprocess)).float(), dim=-1)

        def enc(texts):
            return F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
        acc = zero_shot_accuracy(img, scenes, enc)
    model.train(was_training)
    return acc


def shapes_clip_data(cfg, tokenizer, num_processes: int):
    """:class:`clipkit.core.train_clip.ClipData` of the Shapes CLIP: one scene per sample of the
    run (``steps x batch_size x processes``), each batch rendered at one of ``cfg.render_sizes``."""
    ds = ShapesCaptions("train", length=cfg.steps * cfg.batch_size * num_processes, p_two=cfg.p_two,
                        tokenizer=tokenizer)
    size_rng = random.Random(cfg.seed)

    def to_pixels(batch):
        return render(batch["params"], size=size_rng.choice(cfg.render_sizes))
    return ClipData(ds, shuffle=False, to_pixels=to_pixels, rng={"size_rng": size_rng},
                    evaluate=shapes_clip_eval, eval_columns=("color", "shape", "size", "position"))


def train_clip(cfg, progress: bool = True, reference=None):
    """:func:`clipkit.core.train_clip.train_clip` with the Shapes data for ``cfg.data == "shapes"``."""
    from clipkit.core.train_clip import train_clip as train
    return train(cfg, progress=progress, reference=reference,
                 data=shapes_clip_data if cfg.data == "shapes" else None)


def shapes_reference(scorer) -> dict:
    """The WiSE-FT reference task of a Shapes CLIP: zero-shot colour and shape accuracy."""
    return reference_accuracy(scorer, attributes=("color", "shape"))


# --------------------------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------------------------

def judge_samples(images: torch.Tensor) -> dict:
    """Oracle statistics of unguided samples: valid-object rate and attribute histograms."""
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


def shapes_diffusion_data(cfg, size: int, gen: torch.Generator, num_processes: int):
    """:class:`clipkit.guidance.train_diffusion.DiffusionData` of the Shapes DDPM: scenes from a
    DataLoader, or (``cfg.device_data``) drawn on the device with the trainer's generator; rendered
    at ``size``; samples judged by the oracle."""

    if cfg.device_data:
        def draws():
            while True:
                yield random_params(cfg.batch_size, gen, cfg.p_two)
        batches = draws()
    else:
        ds = ShapesCaptions("train", length=cfg.steps * cfg.batch_size * num_processes, p_two=cfg.p_two)
        batches = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                             collate_fn=collate, drop_last=True)

    def to_images(batch):
        return render(batch["params"] if isinstance(batch, dict) else batch, size=size)
    return DiffusionData(batches, to_images, judge=judge_samples,
                         eval_columns=("valid", "colors", "positions", "objects"))


def train_diffusion(cfg, progress: bool = True):
    """:func:`clipkit.guidance.train_diffusion.train_diffusion` on Shapes renders."""
    from clipkit.guidance.train_diffusion import train_diffusion as train
    return train(cfg, progress=progress, data=shapes_diffusion_data)


# --------------------------------------------------------------------------------------------
# ClipCap
# --------------------------------------------------------------------------------------------

def shapes_captions(scorer, split: str, n: int, cache: Path | None, size: int = 64):
    """:class:`clipkit.captioning.train.CaptionData` of ``n`` scenes of a split: CLIP embeddings
    of their renders (cached) and every describing caption."""
    scenes = [sample_scene(split_seed(split, i)) for i in range(n)]
    keys = [str(s.seed) for s in scenes]
    by_key = {str(s.seed): s for s in scenes}
    embeds = embed_images(scorer, keys, lambda ks: render_scenes([by_key[k] for k in ks], size), cache)
    return CaptionData(embeds, [describing_captions(s) for s in scenes], keys)


def exact_attributes(captions: dict) -> dict:
    """The fraction of captions ({scene seed: caption}) naming exactly their scene's attributes."""
    ok = [caption_matches(c, sample_scene(int(k)))["exact"] for k, c in captions.items()]
    return {"exact_attr": sum(ok) / len(ok)}


def shapes_caption_data(cfg, scorer, cache: Path):
    """:class:`clipkit.captioning.train.CaptionSplits` of the Shapes captioner."""
    return CaptionSplits(shapes_captions(scorer, "train", cfg.shapes_train, cache / "train.safetensors"),
                         shapes_captions(scorer, "val", cfg.shapes_val, cache / "val.safetensors"),
                         metrics=exact_attributes)


def train_captioner(cfg, progress: bool = True):
    """:func:`clipkit.captioning.train.train_captioner` with the Shapes data for ``cfg.data == "shapes"``."""
    from clipkit.captioning.train import train_captioner as train
    return train(cfg, progress=progress, data=shapes_caption_data if cfg.data == "shapes" else None)
