"""Scenes, attributes and captions of the Shapes world (DESIGN §4).

A scene has 1 or 2 objects on a black canvas. Each object has a shape (circle, square,
triangle), a colour (7 pure colours), a size (small, large) and a position (a cell of a 3x3 grid),
plus a small sub-cell jitter. Everything is deterministic from an integer seed.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
# prepositional phrase per position ("a red circle at the top left")
AT = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
      "left": "on the left", "center": "in the center", "right": "on the right",
      "bottom left": "at the bottom left", "bottom": "at the bottom",
      "bottom right": "at the bottom right"}
# short form ("a red circle, left side")
SIDE = {"top left": "top left corner", "top": "top side", "top right": "top right corner",
        "left": "left side", "center": "center", "right": "right side",
        "bottom left": "bottom left corner", "bottom": "bottom side",
        "bottom right": "bottom right corner"}

#: object radius as a fraction of a grid cell (1/3 of the canvas), and the jitter of its centre
RADIUS = {"small": 0.22, "large": 0.38}
JITTER = 0.04
#: split -> first seed; split sizes are effectively unbounded (10^9 seeds each)
SPLITS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0      # jitter of the centre, in cell units
    dy: float = 0.0

    @property
    def row_col(self) -> tuple[int, int]:
        i = POSITIONS.index(self.position)
        return divmod(i, 3)

    @property
    def center(self) -> tuple[float, float]:
        """Centre (x, y) in canvas units [0, 1]."""
        r, c = self.row_col
        return ((c + 0.5 + self.dx) / 3.0, (r + 0.5 + self.dy) / 3.0)

    @property
    def radius(self) -> float:
        return RADIUS[self.size] / 3.0

    def attributes(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    seed: int | None = None

    def attributes(self) -> list[dict]:
        return [o.attributes() for o in self.objects]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(ShapeObject(**o) for o in d["objects"]), d.get("seed"))


def sample_object(rng: random.Random, position: str | None = None, **fixed) -> ShapeObject:
    return ShapeObject(
        shape=fixed.get("shape") or rng.choice(SHAPES),
        color=fixed.get("color") or rng.choice(COLOR_NAMES),
        size=fixed.get("size") or rng.choice(SIZES),
        position=position or rng.choice(POSITIONS),
        dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER))


def sample_scene(seed: int, n_objects: int | None = None, p_two: float = 0.35) -> Scene:
    """The scene of ``seed``: 1 object, or 2 (probability ``p_two``) in different cells."""
    rng = random.Random(seed)
    n = n_objects or (2 if rng.random() < p_two else 1)
    cells = rng.sample(POSITIONS, n)
    return Scene(tuple(sample_object(rng, position=c) for c in cells), seed)


def split_seed(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose {', '.join(SPLITS)}")
    return SPLITS[split] + index


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _obj_full(o: ShapeObject) -> list[str]:
    c, s, z, at = o.color, o.shape, o.size, AT[o.position]
    return [f"a {z} {c} {s} {at}", f"a {c} {s} {at}", f"a {c} {s}, {SIDE[o.position]}",
            f"{o.position}: a {z} {c} {s}", f"there is a {z} {c} {s} {at}",
            f"a {c} {s} {at} on a black background", f"a {z} {c} {s} {at} of the image"
            if o.position != "center" else f"a {z} {c} {s} in the middle"]


def _obj_partial(o: ShapeObject) -> list[str]:
    c, s, z, at = o.color, o.shape, o.size, AT[o.position]
    return [f"a {z} {c} {s}", f"a {c} {s}", f"a {c} shape", f"a {s}", f"something {at}",
            f"a {z} shape", f"a {c} shape {at}", f"a {s} {at}", f"a {z} {s}", f"a {z} {c} shape",
            f"a {z} {s} {at}", f"a {c} object", f"a {z} shape {at}"]


def _relation(a: ShapeObject, b: ShapeObject) -> str | None:
    (ra, ca), (rb, cb) = a.row_col, b.row_col
    da, db = f"a {a.color} {a.shape}", f"a {b.color} {b.shape}"
    if ca < cb:
        return f"{da} to the left of {db}"
    if ca > cb:
        return f"{da} to the right of {db}"
    if ra < rb:
        return f"{da} above {db}"
    return f"{da} below {db}"


def captions(scene: Scene) -> dict[str, list[str]]:
    """All captions of a scene: ``full`` ones name every attribute of every object, ``partial`` ones
    leave some out (generic, single-attribute and relation captions)."""
    objs = scene.objects
    if len(objs) == 1:
        return {"full": _obj_full(objs[0]), "partial": _obj_partial(objs[0])}
    a, b = objs
    fa, fb = _obj_full(a)[0], _obj_full(b)[0]
    full = [f"{fa} and {fb}", f"{_obj_full(a)[1]} and {_obj_full(b)[1]}",
            f"two shapes: {fa} and {fb}", f"{fb} and {fa}"]
    partial = [f"a {a.color} {a.shape} and a {b.color} {b.shape}",
               f"a {a.size} {a.color} {a.shape} and a {b.size} {b.color} {b.shape}",
               _relation(a, b), _relation(b, a), "two shapes", f"a {a.color} shape and a {b.color} shape",
               f"a {a.shape} and a {b.shape}"]
    partial += [f"{p} and another shape" for p in (_obj_full(a)[1], _obj_full(b)[1])]
    return {"full": full, "partial": [p for p in partial if p]}


def canonical_caption(scene: Scene) -> str:
    """The one reference-style caption (first full one)."""
    return captions(scene)["full"][0]


def sample_caption(scene: Scene, rng: random.Random, p_full: float = 0.7) -> str:
    caps = captions(scene)
    pool = caps["full"] if rng.random() < p_full else caps["partial"]
    return rng.choice(pool)


def vocabulary() -> set[str]:
    """Every word the Shapes captions use (for 'unknown word' warnings)."""
    words = {"two", "shapes", "and", "another", "shape", "to", "the", "left", "right", "of",
             "above", "below", "a"}
    for shape, color, size, pos in itertools.product(SHAPES, COLOR_NAMES, SIZES, POSITIONS):
        o = ShapeObject(shape, color, size, pos)
        for c in _obj_full(o) + _obj_partial(o):
            words.update(c.replace(",", " ").replace(":", " ").split())
    return words
