"""Where a prompt puts its objects: position phrases on a 3x3 grid of the image.

"a red circle at the top left and a blue square on the right" names two objects, each in a cell of
a 3x3 grid ("top left": row 0, column 0; "right": row 1, column 2). :func:`split_layout` reads such
a prompt into :class:`Placed` parts, so each object can be guided on its own
(:class:`~clipkit.core.objectives.Erased`: the image with the other objects' cells erased, which is
a one-object image again). The Shapes world lays its objects out on this grid, and its caption
parser reads captions with the same functions (:func:`split_objects`, :func:`find_position`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: grid position -> (row, column), in the Shapes world's order (``clipkit.shapes.world.POSITIONS``)
CELLS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2),
         "left": (1, 0), "center": (1, 1), "right": (1, 2),
         "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
_AT = {rc: pos for pos, rc in CELLS.items()}
_ROW = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COLUMN = {"left": 0, "right": 2}
_CENTER = {"center", "centre", "middle"}
#: words that relate one object to another ("to the left of", "above"): no absolute position ("the top
#: left of the image" is one)
_RELATION = re.compile(r"\b(?:(?:left|right|top|bottom|front|side) of(?!\s+the\s+(?:image|picture|canvas|frame|"
                       r"scene))|above|below|beneath|beside|between|behind|next to|under)\b", re.I)
_AND = re.compile(r"\s*\band\b\s*", re.I)
_LEAD_IN = re.compile(r"^[^:]*:\s*")


def find_position(text: str) -> str | None:
    """The grid position ``text`` names, from its row words (top/upper, bottom/lower) and column words
    (left, right): "at the top left", "upper-left", "center left" (= left), "top middle" (= top),
    "in the middle" (= center); None when it names none."""
    words = re.findall(r"[a-z]+", text.lower())
    rows = [_ROW[w] for w in words if w in _ROW]
    cols = [_COLUMN[w] for w in words if w in _COLUMN]
    if not rows and not cols:
        return "center" if _CENTER.intersection(words) else None
    return _AT[(rows[0] if rows else 1, cols[0] if cols else 1)]


def cell_box(position: str) -> tuple[float, float, float, float]:
    """The cell of a grid position as (x0, y0, x1, y1), fractions of the image's width and height."""
    r, c = CELLS[position]
    return (c / 3, r / 3, (c + 1) / 3, (r + 1) / 3)


def split_objects(text: str) -> list[str]:
    """The object phrases of a caption or prompt: a lead-in ending in ":" that names no position
    ("two shapes: ...") dropped, split at the word "and", each without trailing punctuation."""
    text = text.strip()
    lead = _LEAD_IN.match(text)
    if lead and find_position(lead.group(0)) is None:
        text = text[lead.end():]
    return [p for p in (p.strip().rstrip(".,;").strip() for p in _AND.split(text)) if p]


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
    the prompt's object phrases (:func:`split_objects`), when there are two or more and each names its
    own grid position; otherwise None (one object, a phrase without a position or relating objects to
    each other, two phrases in one cell)."""
    pieces = split_objects(prompt)
    if len(pieces) < 2 or any(_RELATION.search(p) for p in pieces):
        return None
    placed = [Placed(p, find_position(p)) for p in pieces]
    positions = [p.position for p in placed]
    if None in positions or len(set(positions)) != len(positions):
        return None
    return placed
