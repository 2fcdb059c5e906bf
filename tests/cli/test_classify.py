"""`clipkit classify`: zero-shot labels through the library's classify, rendered as JSON or a table."""
import json

from clipkit.cli.main import cli


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


def test_classify_json_is_the_library_result(runner, shape_images):
    """The command renders clipkit.core.prompts.classify's result: same labels, same probabilities."""
    from clipkit.core.prompts import classify
    from clipkit.core.scorer import load_scorer
    folder, paths = shape_images
    res = runner.invoke(cli, ["-q", "classify", str(folder), "--labels", "red, blue", "--templates", "a {} shape",
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    want = classify(list(map(str, paths)), "red,blue", "a {} shape", scorer=load_scorer("shapes", device="cpu"))
    assert {k: doc[k] for k in ("model", "labels", "templates", "results")} == want.to_dict()
    assert doc["skipped"] == [{"path": str(folder / "broken.png"), "reason": "not an image Pillow can identify"}]


def test_classify_table_top_k(runner, shape_images):
    _, paths = shape_images
    res = runner.invoke(cli, ["-q", "classify", *map(str, paths), "--labels", "red,green,blue", "--top", "2",
                              "--templates", "a {} shape"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "# zero-shot probabilities (shapes, 1 template)"
    assert lines[1].split() == ["image", "#1", "#2"]
    assert lines[3].startswith(str(paths[0])) and lines[3].split()[1] == "red"
