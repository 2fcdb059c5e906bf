"""Shapes pictures for the search tests."""
from __future__ import annotations

COLORS = ("red", "green", "blue", "yellow")


def render(scenes, size=64):
    from clipkit.shapes.data import render_pil
    return render_pil(scenes, size)


def scene(shape, color, position="center", size="large"):
    from clipkit.shapes.world import Scene, ShapeObject
    return Scene((ShapeObject(shape, color, size, position),))


def make_images(folder, n_red=4, n_other=8):
    """Red circles at varied positions + other colours/shapes; two byte-identical files (a tie)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    pos = ["top left", "top right", "bottom left", "bottom right", "center", "left", "right", "top"]
    scenes = [scene("circle", "red", pos[i % 8]) for i in range(n_red)]
    scenes += [scene(("square", "triangle")[i % 2], COLORS[1 + i % 3], pos[i % 8]) for i in range(n_other)]
    paths = []
    for i, im in enumerate(render(scenes)):
        p = folder / ("sub" if i % 3 == 2 else ".") / f"img{i:02d}.png"
        im.save(p)
        paths.append(p)
    return paths
