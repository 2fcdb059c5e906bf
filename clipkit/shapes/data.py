"""Datasets of the Shapes world, rendered on the fly (no image files in git).

Items carry the packed scene (``params``), so images can be rendered in batches on the training
device (see :func:`clipkit.shapes.render.render`); ``ShapesImages`` renders PIL images for tools
that want files or PIL inputs.
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from clipkit.shapes.render import pack, render_scenes, to_pil
from clipkit.shapes.world import Scene, sample_caption, sample_scene, split_seed


class ShapesCaptions(Dataset):
    """(scene params, caption) pairs of a split. Item ``i`` is the scene of seed ``split_start + offset + i``.

    The caption is drawn from the scene's captions with an RNG seeded by (seed, ``epoch``), so the
    dataset is deterministic; bump ``epoch`` for fresh captions.
    """

    def __init__(self, split: str = "train", length: int = 10_000, offset: int = 0,
                 p_two: float = 0.35, p_full: float = 0.7, tokenizer=None, epoch: int = 0):
        self.split, self.length, self.offset = split, length, offset
        self.p_two, self.p_full, self.tokenizer, self.epoch = p_two, p_full, tokenizer, epoch

    def __len__(self):
        return self.length

    def scene(self, i: int) -> Scene:
        return sample_scene(split_seed(self.split, self.offset + i), p_two=self.p_two)

    def __getitem__(self, i):
        sc = self.scene(i)
        cap = sample_caption(sc, random.Random(sc.seed * 1009 + self.epoch), self.p_full)
        item = {"params": pack([sc])[0], "caption": cap}
        if self.tokenizer is not None:
            item["tokens"] = self.tokenizer([cap])[0]
        return item


def single_object_scenes(split: str, n: int, offset: int = 0) -> list[Scene]:
    return [sample_scene(split_seed(split, offset + i), n_objects=1) for i in range(n)]


def two_object_scenes(split: str, n: int, offset: int = 0) -> list[Scene]:
    return [sample_scene(split_seed(split, offset + i), n_objects=2) for i in range(n)]


def render_pil(scenes, size: int = 64):
    return to_pil(render_scenes(scenes, size))


def collate(items):
    out = {"params": torch.stack([it["params"] for it in items]),
           "caption": [it["caption"] for it in items]}
    if "tokens" in items[0]:
        out["tokens"] = torch.stack([it["tokens"] for it in items])
    return out
