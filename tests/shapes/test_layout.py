"""core/layout.py: position phrases on a 3x3 grid, and prompts split into placed objects."""
import pytest

from clipkit.shapes.layout import CELLS, Placed, cell_box, find_position, split_layout, split_objects


@pytest.mark.parametrize("text,pos", [
    ("a red circle at the top left", "top left"), ("a square on the RIGHT", "right"),
    ("a triangle in the middle", "center"), ("at the bottom right", "bottom right"), ("the top left corner", "top left"),
    ("a circle, left side", "left"), ("top-left", "top left"), ("upper left", "top left"),
    ("lower-right corner", "bottom right"), ("center left", "left"), ("middle right", "right"),
    ("top middle", "top"), ("top center", "top"), ("in the centre", "center"),
    ("a blue square", None), ("leftover", None), ("", None)])
def test_find_position_reads_rows_and_columns(text, pos):
    assert find_position(text) == pos


def test_cells_tile_the_image_as_the_shapes_world_places_objects():
    from clipkit.shapes.world import POSITIONS, ShapeObject
    assert list(CELLS) == list(POSITIONS)
    assert all(CELLS[p] == ShapeObject("circle", "red", "large", p).row_col for p in POSITIONS)
    boxes = [cell_box(p) for p in CELLS]
    assert cell_box("top left") == (0, 0, 1 / 3, 1 / 3) and cell_box("bottom right") == (2 / 3, 2 / 3, 1, 1)
    assert sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) == pytest.approx(1.0)
    assert len(set(boxes)) == 9


def test_split_objects():
    assert split_objects("Two shapes: a red circle at the top left and a blue square on the right.") == [
        "a red circle at the top left", "a blue square on the right"]
    assert split_objects("a sandwich on the left, and a band on the right;") == [
        "a sandwich on the left", "a band on the right"]                   # "and" inside words is kept
    assert split_objects("top left: a large red circle") == ["top left: a large red circle"]   # a position lead-in
    assert split_objects("") == []


def test_split_layout():
    assert split_layout("a red circle at the top left and a blue square on the right") == [
        Placed("a red circle at the top left", "top left"), Placed("a blue square on the right", "right")]
    assert split_layout("two shapes: a red circle at the center left and a blue square at the top-right.") == [
        Placed("a red circle at the center left", "left"), Placed("a blue square at the top-right", "top right")]
    three = split_layout("a red circle at the top  AND a cyan square in the middle and a white triangle at the bottom")
    assert [p.position for p in three] == ["top", "center", "bottom"]
    assert three[1].box == (1 / 3, 1 / 3, 2 / 3, 2 / 3)
    assert split_layout("a red circle at the top left") is None                       # one object
    assert split_layout("a red circle on the left and a blue square") is None          # one without a position
    assert split_layout("a red circle on the left and a blue square on the left") is None   # one cell
    assert split_layout("a red circle to the left of a blue square and a green one at the top") is None  # a relation
    assert split_layout("a red circle above a blue square and a green one on the right") is None
    assert [p.position for p in split_layout("a red circle at the top left of the image and a blue square on the "
                                             "right side of the canvas")] == ["top left", "right"]
    assert split_layout("a sandwich") is None and split_layout("") is None
