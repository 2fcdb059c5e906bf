"""shapes.recipes: the oracle statistics of samples and the exact-attribute score of captions (the
recipes' training entry points run in tests/core/test_train_clip.py, tests/captioning/test_train.py,
tests/guidance/test_train_diffusion.py)."""
import torch

from clipkit.shapes.recipes import exact_attributes, judge_samples
from clipkit.shapes.render import render_scenes
from clipkit.shapes.world import Scene, ShapeObject, canonical_caption, sample_scene


def test_exact_attributes_counts_captions_naming_their_scene():
    right = {str(s): canonical_caption(sample_scene(s)) for s in (0, 1, 2)}
    assert exact_attributes(right) == {"exact_attr": 1.0}
    wrong = {**right, "3": "nothing at all"}
    assert exact_attributes(wrong) == {"exact_attr": 0.75}


def test_judge_samples_on_renders_and_a_blank():
    scenes = [Scene((ShapeObject("circle", "red", "large", "top left"),)),
              Scene((ShapeObject("square", "blue", "large", "bottom right"),))]
    images = torch.cat([render_scenes(scenes, 64), torch.zeros(1, 3, 64, 64)])
    out = judge_samples(images)
    assert abs(out["valid"] - 2 / 3) < 1e-9 and out["objects"] == {0: 1, 1: 2}
    assert out["colors"] == {"red": 1, "blue": 1} and out["shapes"] == {"circle": 1, "square": 1}
    assert out["positions"] == {"top left": 1, "bottom right": 1}
