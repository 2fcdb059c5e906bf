"""Reading Shapes captions back into attributes (the captioning judge)."""
from clipkit.shapes.parse import caption_matches, describing_captions, parse_caption
from clipkit.shapes.world import Scene, ShapeObject

RED = ShapeObject("circle", "red", "large", "top left")
BLUE = ShapeObject("square", "blue", "small", "right")


def test_parse_two_objects_and_synonyms():
    assert parse_caption("Two shapes: a large red circle at the top left and a small blue square on the right.") == [
        {"color": "red", "shape": "circle", "size": "large", "position": "top left"},
        {"color": "blue", "shape": "square", "size": "small", "position": "right"}]
    (obj,) = parse_caption("a green triangle in the middle")
    assert obj == {"color": "green", "shape": "triangle", "size": None, "position": "center"}


def test_caption_matches_pairs_objects_in_any_order():
    two = Scene((RED, BLUE))
    swapped = caption_matches("a small blue square on the right and a large red circle at the top left", two)
    assert swapped["exact"] and all(swapped.values())
    wrong = caption_matches("a large red circle at the top left and a small blue square on the left", two)
    assert wrong["color"] and wrong["shape"] and not wrong["position"] and not wrong["exact"]
    short = caption_matches("a large red circle at the top left", two)          # an object missing
    assert not any(short.values())


def test_describing_captions_name_every_attribute():
    one = Scene((RED,))
    caps = describing_captions(one)
    assert caps and all(caption_matches(c, one)["exact"] for c in caps)
    assert "a red shape" not in caps
