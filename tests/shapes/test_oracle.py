"""The oracle reads Shapes attributes back from pixels: accuracy on clean and noisy renders, refusals,
and the lenient and strict judges."""
from collections import Counter

import pytest
import torch

from clipkit.shapes.oracle import matches, read_attributes, strict_match, to_dicts
from clipkit.shapes.render import render_scenes
from clipkit.shapes.world import Scene, ShapeObject, sample_scene, split_seed


@pytest.mark.parametrize("size", [32, 64])
def test_oracle_accuracy_clean(size):
    n, ok = 150, Counter()
    scenes = [sample_scene(split_seed("test", i)) for i in range(n)]
    imgs = render_scenes(scenes, size)
    total = 0
    for sc, im in zip(scenes, imgs):
        found = read_attributes(im)
        assert len(found) == len(sc.objects)
        for exp in sc.attributes():
            total += 1
            for k in ("shape", "color", "size", "position"):
                ok[k] += matches(found, {k: exp[k], "position": exp["position"]})
    for k in ok:
        assert ok[k] / total >= 0.99, (k, ok[k] / total)


def test_oracle_mild_noise():
    scenes = [sample_scene(split_seed("val", i)) for i in range(60)]
    imgs = render_scenes(scenes, 32)
    noisy = (imgs + 0.05 * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    good = sum(all(matches(read_attributes(im), e) for e in sc.attributes()) for sc, im in zip(scenes, noisy))
    assert good / len(scenes) >= 0.95


def test_oracle_rejects_noise_and_blank():
    assert read_attributes(torch.zeros(3, 32, 32)) == []
    junk = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not any(o.valid for o in read_attributes(junk)) or len(read_attributes(junk)) > 2


def test_strict_judge_on_renders():
    """The strict judge (a person's reading): exactly the named objects, every attribute right."""
    red = ShapeObject("square", "red", "large", "bottom left")
    blue = ShapeObject("circle", "blue", "large", "top right")
    one, two = (read_attributes(render_scenes([Scene(objs)], 64)[0]) for objs in ((red,), (red, blue)))
    want_red = {"color": "red", "shape": "square", "position": "bottom left"}
    assert strict_match(one, [want_red]) and matches(one, want_red)
    assert not strict_match(two, [want_red]) and matches(two, want_red)    # an extra object: lenient only
    assert not strict_match(one, [{**want_red, "shape": "circle"}])          # wrong shape
    want_blue = {"color": "blue", "shape": "circle", "position": "top right"}
    assert strict_match(two, [want_blue, want_red]) and strict_match(two, [want_red, want_blue])
    assert not strict_match(two, [want_blue, {**want_red, "color": "green"}])
    assert not strict_match([], [want_red])


def test_to_dicts_reads_back_one_object():
    obj = ShapeObject("triangle", "green", "small", "center")
    (d,) = to_dicts(read_attributes(render_scenes([Scene((obj,))], 64)[0]))
    assert {k: d[k] for k in ("shape", "color", "size", "position")} == \
        {"shape": "triangle", "color": "green", "size": "small", "position": "center"}
