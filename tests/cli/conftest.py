"""Fixtures of the CLI tests: a CliRunner and a folder of two Shapes renders plus a broken file."""
import pytest
from click.testing import CliRunner


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def shape_images(tmp_path):
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import Scene, ShapeObject
    scenes = [Scene((ShapeObject("circle", "red", "large", "top left"),)),
              Scene((ShapeObject("square", "blue", "large", "bottom right"),))]
    paths = []
    for i, im in enumerate(render_pil(scenes, 64)):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"nope")
    return tmp_path, paths
