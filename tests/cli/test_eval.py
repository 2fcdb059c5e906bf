"""``clipkit eval`` and the labelled-data options of ``clipkit train clip``, through click's CliRunner."""
import csv
import json

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, make_colour_folder

from clipkit.cli.main import cli


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("c") / "colours")


def run(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


def test_eval_json_csv_and_plot(tmp_path, colours, tiny_openclip_dir):
    names = tmp_path / "names.txt"
    names.write_text("red,a red thing\n")
    r = run("eval", colours, "--clip", tiny_openclip_dir, "--class-names", names, "--templates", "a {}",
            "--csv", tmp_path / "r.csv", "--plot", tmp_path / "cm.png", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["split"] == "test" and doc["method"] == "zero-shot" and doc["images"] == 9
    assert [c["name"] for c in doc["classes"]] == ["blue", "green", "a red thing"]
    assert len(doc["confusion"]) == 3 and sum(map(sum, doc["confusion"])) == 9 and doc["skipped"] == []
    rows = list(csv.reader((tmp_path / "r.csv").open()))
    assert rows[0] == ["class", "name", "images", "correct", "accuracy"] and rows[-1][0] == "(all)"
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    again = run("eval", colours, "--clip", tiny_openclip_dir, "--csv", tmp_path / "r.csv")
    assert_one_line_error(again, "refusing to overwrite")


def test_eval_table_and_linear_probe(colours, tiny_openclip_dir):
    r = run("eval", colours, "--clip", tiny_openclip_dir, "--linear-probe", "--shots", "2", "--split", "val")
    assert r.exit_code == 0, r.output
    assert "linear probe" in r.output and "2-shot" in r.output and "[val]" in r.output and "top-1" in r.output


def test_eval_bad_input_is_one_line(tmp_path, colours, tiny_openclip_dir):
    assert_one_line_error(run("eval", colours, "--clip", tiny_openclip_dir, "--split", "holdout"), "no 'holdout' split")
    single = make_colour_folder(tmp_path / "s", {"": 1})
    for d in ("green", "blue"):
        for f in (single / d).iterdir():
            f.unlink()
        (single / d).rmdir()
    assert_one_line_error(run("eval", single, "--clip", tiny_openclip_dir), "classification needs at least 2")
    assert_one_line_error(run("eval", colours, "--shots", "3"), "--linear-probe")
    assert_one_line_error(run("eval", tmp_path / "nothing"), "no such folder")


def test_train_clip_labelled_options(tmp_path, colours, tiny_openclip_dir):
    assert_one_line_error(run("train", "clip", "--out", tmp_path / "a", "--class-names", "x.json"), "labelled --data")
    assert_one_line_error(run("train", "clip", "--data", colours, "--out", tmp_path / "b", "--wise", "0.5"), "--init")
    assert_one_line_error(run("train", "clip", "--data", colours, "--init", tiny_openclip_dir, "--out", tmp_path / "c",
                       "--wise", "0.5", "--reference", "nope"), "--reference")
    r = run("train", "clip", "--data", colours, "--init", tiny_openclip_dir, "--out", tmp_path / "ft",
            "--steps", "1", "--batch-size", "4", "--templates", "a {} shape", "--wise", "0.5",
            "--reference", "shapes", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [row["alpha"] for row in doc["wise"]["rows"]] == [0.0, 0.5, 1.0]
    assert set(doc["wise"]["rows"][0]["reference"]) == {"color", "shape"}
    assert (tmp_path / "ft" / "wise.csv").read_text().startswith("alpha,model,test_top1")


def test_train_clip_noise_options(tmp_path, colours, monkeypatch):
    assert_one_line_error(run("train", "clip", "--out", tmp_path / "a", "--noise-fraction", "0.7"), "--noise-aware")
    assert_one_line_error(run("train", "clip", "--data", colours, "--out", tmp_path / "b", "--render-size", "32"),
                          "--data shapes")
    assert_one_line_error(run("train", "clip", "--out", tmp_path / "c", "--noise-aware", "--noise-fraction", "1.5"),
                          "1.5")
    seen = {}

    def fake(cfg, progress=True, reference=None):
        seen["cfg"] = cfg
        raise SystemExit(0)
    monkeypatch.setattr("clipkit.shapes.recipes.train_clip", fake)
    run("train", "clip", "--out", tmp_path / "d", "--noise-aware", "--noise-fraction", "0.75",
        "--render-size", "32", "--train-only", "visual.")
    cfg = seen["cfg"]
    assert cfg.noise_aware and cfg.noise_fraction == 0.75 and cfg.render_sizes == (32,) and cfg.train_only == ("visual.",)
    run("train", "clip", "--out", tmp_path / "e", "--noise-aware")       # without them: the config's defaults
    assert seen["cfg"].noise_fraction == 0.5 and seen["cfg"].render_sizes == (32, 48, 64)
    assert_one_line_error(run("train", "clip", "--out", tmp_path / "f", "--noise-aware", "--noise-fraction", "0"), "0")


def test_eval_real_subprocess(colours, tiny_openclip_dir):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "clipkit", "-q", "eval", str(colours), "--clip", str(tiny_openclip_dir),
                        "--split", "val", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)                            # stdout holds the JSON document and nothing else
    assert doc["split"] == "val" and doc["images"] == 6 and doc["images_per_s"] > 0


def test_wise_reference_tasks(colours, tiny_openclip_dir):
    from clipkit.cli.train import reference_task
    from clipkit.core.scorer import load_scorer
    assert reference_task("auto", str(tiny_openclip_dir)) == (None, None)   # not a Shapes CLIP: no reference
    assert reference_task("auto", "shapes")[0] == "shapes zero-shot"
    assert reference_task("none", "shapes") == (None, None)
    name, fn = reference_task(str(colours), str(tiny_openclip_dir))         # a labelled folder: its zero-shot top-1
    assert name.startswith("zero-shot on") and set(fn(load_scorer(str(tiny_openclip_dir), device="cpu"))) == {"top1"}
