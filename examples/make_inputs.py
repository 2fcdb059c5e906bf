"""The two inputs the README's generate examples use, rendered by the Shapes world (32 px, as the
bundled models see them): `render.png` (a large yellow triangle at the top right, an --image-prompt)
and `blue.png` (a large blue square at the bottom right, an --init-image to recolour).

    python examples/make_inputs.py [OUT_DIR]        # default: examples/
"""
import sys
from pathlib import Path

from PIL import Image

from clipkit.shapes.render import render_scenes
from clipkit.shapes.world import Scene, ShapeObject


def save(obj: ShapeObject, path: Path) -> None:
    x = render_scenes([Scene((obj,))])[0]
    Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    out.mkdir(parents=True, exist_ok=True)
    save(ShapeObject("triangle", "yellow", "large", "top right"), out / "render.png")
    save(ShapeObject("square", "blue", "large", "bottom right"), out / "blue.png")
    print(f"wrote {out / 'render.png'} and {out / 'blue.png'}")
