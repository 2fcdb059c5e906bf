"""Read a Shapes caption back into objects (colour, shape, size, position) — the captioning judge.

Parsing is by vocabulary, not by a learned model: the caption is split into object phrases at
" and " (after dropping a "two shapes:" lead-in; :func:`clipkit.core.layout.split_objects`), and each
phrase's colour, shape and size words are looked up, its position read as a cell of the 3x3 grid
(:func:`clipkit.core.layout.find_position`; "middle" = center). A missing word leaves that
attribute ``None``.
"""
from __future__ import annotations

import re

from clipkit.shapes.layout import find_position, split_objects
from clipkit.shapes.world import COLOR_NAMES, SHAPES, SIZES, Scene, captions

ATTRIBUTES = ("color", "shape", "size", "position")


def _find(words: list[str], vocab) -> str | None:
    hits = [w for w in words if w in vocab]
    return hits[0] if hits else None


def parse_caption(caption: str) -> list[dict]:
    """``"a large red circle at the top left and a blue square on the right"`` ->
    ``[{color: red, shape: circle, size: large, position: top left}, {...}]``."""
    objs = []
    for part in split_objects(caption.lower()):
        words = re.findall(r"[a-z]+", part)
        if not words:
            continue
        objs.append({"color": _find(words, COLOR_NAMES), "shape": _find(words, SHAPES),
                     "size": _find(words, SIZES), "position": find_position(part)})
    return objs


def caption_matches(caption: str, scene: Scene, attributes=ATTRIBUTES) -> dict[str, bool]:
    """Per attribute: does the caption name every object's value correctly (objects matched as a set,
    in the best pairing)? Plus ``exact``: all attributes and the object count right."""
    parsed, truth = parse_caption(caption), scene.attributes()
    out = {a: False for a in attributes}
    if len(parsed) == len(truth):
        orders = [truth] if len(truth) == 1 else [truth, truth[::-1]]
        best = None
        for order in orders:
            res = {a: all(p[a] == t[a] for p, t in zip(parsed, order)) for a in attributes}
            if best is None or sum(res.values()) > sum(best.values()):
                best = res
        out = best
    out["exact"] = len(parsed) == len(truth) and all(out[a] for a in attributes)
    return out


def describing_captions(scene: Scene) -> list[str]:
    """The scene's full captions that name every attribute of every object (the captioner's targets)."""
    return [c for c in captions(scene)["full"] if caption_matches(c, scene)["exact"]]
