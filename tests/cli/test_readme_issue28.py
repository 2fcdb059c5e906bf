"""Issue 28, item 8: inputs are checked before a model loads; every file a command writes is said
on stderr (as `score --plot` does); counts read "1 template", "2 templates"."""
import pytest
from click.testing import CliRunner
from helpers import make_colour_folder

from clipkit.cli.main import cli


def _no_model(*a, **k):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.mark.parametrize("argv", [["score", "missing.png", "-t", "a"],
                                  ["classify", "missing.png", "--labels", "a,b"],
                                  ["rerank", "missing/", "-q", "a", "--no-cache"],
                                  ["rerank", "missing.png", "--query-image", "gone.png", "--no-cache"]])
def test_missing_input_fails_before_the_model_loads(argv, monkeypatch, tmp_path):
    import clipkit.cli.classify
    import clipkit.cli.rerank
    import clipkit.cli.score
    for mod in (clipkit.cli.score, clipkit.cli.classify, clipkit.cli.rerank):
        monkeypatch.setattr(mod, "make_scorer", _no_model)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["-q", *argv])
    assert r.exit_code == 2, r.output
    assert "missing" in r.stderr or "could be read" in r.stderr or "no image files" in r.stderr


def test_caption_missing_input_fails_before_the_model_loads(monkeypatch, tmp_path):
    import clipkit.captioning.captioner
    monkeypatch.setattr(clipkit.captioning.captioner, "load_captioner", _no_model)
    r = CliRunner().invoke(cli, ["-q", "caption", str(tmp_path / "missing.png")])
    assert r.exit_code == 2, r.output


def test_rerank_sheet_and_csv_are_said(shape_images, tmp_path):
    d, _ = shape_images
    sheet, table = tmp_path / "out" / "top.png", tmp_path / "out" / "top.csv"
    r = CliRunner().invoke(cli, ["-q", "rerank", str(d), "-q", "a red shape", "--sheet", str(sheet),
                                 "--csv", str(table), "--no-cache"])
    assert r.exit_code == 0, r.output
    assert f"wrote {sheet}" in r.stderr and f"wrote {table}" in r.stderr and sheet.exists()


def test_eval_plot_is_said(tmp_path, tiny_openclip_dir):
    data = make_colour_folder(tmp_path / "colours")
    r = CliRunner().invoke(cli, ["-q", "eval", str(data), "--clip", str(tiny_openclip_dir), "--plot",
                                 str(tmp_path / "cm.png"), "--templates", "a {}"])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'cm.png'}" in r.stderr
    assert "1 template" in r.stdout and "1 templates" not in r.stdout
