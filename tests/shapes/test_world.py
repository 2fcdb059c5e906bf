"""The Shapes world: seeded scenes, splits and captions."""
import pytest

from clipkit.shapes.world import Scene, ShapeObject, captions, sample_scene, split_seed, vocabulary


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
