"""`clipkit score`: cosine table, --json, --plot."""
import json

from PIL import Image

from clipkit.cli.main import cli


def test_score_json_is_only_json(runner, shape_images):
    folder, paths = shape_images
    res = runner.invoke(cli, ["score", str(folder), "-t", "a red circle", "-t", "a blue square", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)                      # stdout holds one JSON document and nothing else
    assert doc["score"] == "cosine" and doc["model"] == "shapes"
    by_path = {r["path"]: r["scores"] for r in doc["results"]}
    red, blue = by_path[str(paths[0])], by_path[str(paths[1])]
    assert red[0] > red[1] and blue[1] > blue[0]
    assert doc["skipped"] == [{"path": str(folder / "broken.png"), "reason": "not an image Pillow can identify"}]
    assert "note: using the bundled" in res.stderr


def test_score_plot(runner, shape_images, tmp_path):
    _, paths = shape_images
    out = tmp_path / "sim.png"
    res = runner.invoke(cli, ["-q", "score", *map(str, paths), "-t", "a red circle", "-t", "a square", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size[0] > 100
