from collections import Counter

import pytest
import torch

from clipkit.shapes.oracle import matches, read_attributes
from clipkit.shapes.render import pack, random_params, render, render_scenes
from clipkit.shapes.world import (COLOR_NAMES, POSITIONS, SHAPES, Scene, ShapeObject, captions,
                                  sample_scene, split_seed, vocabulary)


def test_scenes_deterministic_and_valid():
    assert sample_scene(5) == sample_scene(5)
    assert sample_scene(5) != sample_scene(6)
    for seed in range(200):
        sc = sample_scene(seed)
        assert 1 <= len(sc.objects) <= 2
        assert len({o.position for o in sc.objects}) == len(sc.objects)     # distinct cells
    assert split_seed("test", 3) != split_seed("train", 3)
    with pytest.raises(ValueError):
        split_seed("dev", 0)
    sc = sample_scene(11)
    assert Scene.from_dict(sc.to_dict()) == sc


def test_captions_cover_attributes():
    sc = Scene((ShapeObject("triangle", "cyan", "small", "bottom left"),))
    caps = captions(sc)
    assert "a small cyan triangle at the bottom left" in caps["full"]
    assert "a cyan shape" in caps["partial"] and "something at the bottom left" in caps["partial"]
    two = captions(sample_scene(0, n_objects=2))
    assert all(" and " in c for c in two["full"])
    assert {"red", "circle", "left", "top"} <= vocabulary()


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


def test_strict_judge_on_renders():
    """The strict judge (a person's reading): exactly the named objects, every attribute right."""
    from clipkit.shapes.oracle import matches, read_attributes, strict_match
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import Scene, ShapeObject
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
