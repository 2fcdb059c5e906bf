"""Where a prompt puts its objects: position phrases on a 3x3 grid of the image.

"a red circle at the top left and a blue square on the right" names two objects, each in a cell of
a 3x3 grid ("top left": row 0, column 0; "right": row 1, column 2). :func:`split_layout` reads such
a prompt into :class:`Placed` parts, so each object can be guided on its own
(:class:`~clipkit.core.objectives.Erased`: the image with the other objects' cells erased, which is
a one-object image again). The Shapes world lays its objects out on this grid, and its caption
parser reads positions with the same words (:func:`find_position`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: grid position -> (row, column)
CELLS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2),
         "left": (1, 0), "center": (1, 1), "right": (1, 2),
         "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
#: phrase -> grid position, longest first ("top left" before "left"); "middle" = center
POSITION_WORDS = (("top left", "top left"), ("top right", "top right"), ("bottom left", "bottom left"),
                  ("bottom right", "bottom right"), ("center", "center"), ("middle", "center"),
                  ("top", "top"), ("bottom", "bottom"), ("left", "left"), ("right", "right"))
_AND = re.compile(r"\s+and\s+", re.I)


def find_position(text: str) -> str | None:
    """The grid position ``text`` names (its longest position phrase), or None."""
    text = text.lower()
    for phrase, pos in POSITION_WORDS:
        if re.search(rf"\b{phrase}\b", text):
            return pos
    return None


def cell_box(position: str) -> tuple[float, float, float, float]:
    """The cell of a grid position as (x0, y0, x1, y1), fractions of the image's width and height."""
    r, c = CELLS[position]
    return (c / 3, r / 3, (c + 1) / 3, (r + 1) / 3)


@dataclass(frozen=True)
class Placed:
    """One object phrase of a prompt and the grid position it names."""
    text: str
    position: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return cell_box(self.position)


def split_layout(prompt: str) -> list[Placed] | None:
    """``"A at the top left and B on the right"`` -> ``[Placed(A..., "top left"), Placed(B..., "right")]``:
    the prompt's phrases joined by "and", when there are two or more and each names its own grid
    position; otherwise None (one object, a phrase without a position, two phrases in one cell)."""
    pieces = [p.strip() for p in _AND.split(prompt.strip()) if p.strip()]
    if len(pieces) < 2:
        return None
    placed = [Placed(p, find_position(p)) for p in pieces]
    positions = [p.position for p in placed]
    if None in positions or len(set(positions)) != len(positions):
        return None
    return placed
