"""The Shapes renderer: deterministic, anti-aliased, any size; packed parameters and random scenes."""
from collections import Counter

import torch

from clipkit.shapes.oracle import read_attributes
from clipkit.shapes.render import pack, random_params, render, render_scenes, to_pil
from clipkit.shapes.world import COLOR_NAMES, POSITIONS, SHAPES, Scene, ShapeObject, sample_scene


def test_renderer_deterministic_antialiased_any_size():
    scenes = [sample_scene(i) for i in range(4)]
    a = render_scenes(scenes, 32)
    assert torch.equal(a, render_scenes(scenes, 32))
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    vals = a.unique()
    assert ((vals > 0.05) & (vals < 0.95)).any()           # anti-aliased edges
    assert render_scenes(scenes, 77).shape[-1] == 77
    # black background
    assert float(a[:, :, 0, 0].abs().max()) == 0.0


def test_random_params_distribution():
    p = random_params(6000, torch.Generator().manual_seed(0), p_two=0.35)
    assert abs(float(p[:, 1, 0].mean()) - 0.35) < 0.03
    ims = render(p[:100], 32)
    for im, pp in zip(ims, p[:100]):
        assert len(read_attributes(im)) == int(pp[:, 0].sum())
    colors = Counter(tuple(c) for c in p[:, 0, 5:8].tolist())
    assert len(colors) == len(COLOR_NAMES)
    assert min(colors.values()) > 6000 / 7 * 0.85
    assert pack([sample_scene(1)]).shape == (1, 2, 8)
    assert len(SHAPES) == 3 and len(POSITIONS) == 9


def test_object_lands_in_its_cell_with_its_colour():
    """A large red square at the top left: red pixels only in the top-left third, black elsewhere."""
    im = render_scenes([Scene((ShapeObject("square", "red", "large", "top left"),))], 48)[0]    # [3, H, W]
    fg = im.sum(0) > 0.5
    assert fg[:16, :16].any() and not fg[:, 32:].any() and not fg[32:, :].any()
    r, g, b = (im[c][fg].mean().item() for c in range(3))
    assert r > 0.9 and g < 0.1 and b < 0.1
    pil = to_pil(im[None])[0]
    assert pil.size == (48, 48) and pil.mode == "RGB"
