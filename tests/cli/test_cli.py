import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from clipkit.cli.main import COMMANDS, cli


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


@pytest.mark.parametrize("args", [[]] + [[c] for c in COMMANDS] + [["train", "clip"], ["train", "diffusion"]])
def test_every_help(runner, args):
    res = runner.invoke(cli, args + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


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


def test_classify(runner, shape_images):
    _, paths = shape_images
    res = runner.invoke(cli, ["classify", *map(str, paths), "--labels", "red,green,blue",
                              "--templates", "a {} shape", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [r["label"] for r in doc["results"]] == ["red", "blue"]
    assert abs(sum(doc["results"][0]["probs"].values()) - 1) < 1e-5
    res = runner.invoke(cli, ["-q", "classify", *map(str, paths), "--labels", "red,blue"])
    assert res.exit_code == 0 and "red" in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["score", "{img}", "-t", ""], "empty"),
    (["score", "{missing}", "-t", "x"], "none of the 1 files"),
    (["score", "{img}", "-t", "x", "--clip", "nonsense"], "unknown model spec"),
    (["classify", "{img}", "--labels", "a,a"], "duplicate"),
    (["classify", "{img}", "--labels", "a,b", "--templates", "no-placeholder"], "templates"),
    (["--device", "tpu", "score", "{img}", "-t", "x"], "unknown device"),
])
def test_bad_input_exit_2_one_line(runner, shape_images, args, needle):
    folder, paths = shape_images
    args = [a.format(img=paths[0], missing=folder / "missing.png") for a in args]
    res = runner.invoke(cli, args)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("Error:") and needle in err
    assert "Traceback" not in res.output


def test_unexpected_failure_exit_1(runner, shape_images, monkeypatch):
    import clipkit.core.scorer as scorer_mod

    def boom(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(scorer_mod, "load_scorer", boom)
    _, paths = shape_images
    res = runner.invoke(cli, ["score", str(paths[0]), "-t", "x"])
    assert res.exit_code == 1
    assert "unexpected failure: RuntimeError: kaboom" in res.stderr and "Traceback" not in res.stderr
    res = runner.invoke(cli, ["-v", "score", str(paths[0]), "-t", "x"])
    assert res.exit_code == 1 and "Traceback" in res.stderr


def test_models_json(runner):
    res = runner.invoke(cli, ["models", "--json"])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert {"shapes", "sd"} <= set(doc["profiles"])
    assert any(m["spec"] == "shapes" and m["available"] for m in doc["models"])


def test_help_does_not_import_torch():
    code = "import sys; from clipkit.cli.main import cli; cli(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_real_subprocess(shape_images):
    _, paths = shape_images
    out = subprocess.run([sys.executable, "-m", "clipkit", "-q", "classify", str(paths[0]),
                          "--labels", "red,blue", "--templates", "a {} shape", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["label"] == "red"
    bad = subprocess.run([sys.executable, "-m", "clipkit", "score", str(paths[0]), "-t", " "],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("Error:")
