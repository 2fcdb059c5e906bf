"""`clipkit rerank`: JSON, CSV and contact-sheet outputs, the cache, several queries, texts, errors."""
import csv
import json

from click.testing import CliRunner
from PIL import Image

from clipkit.cli.main import cli


def test_cli_outputs(rerank_folder, tmp_path):
    d, _ = rerank_folder
    r = CliRunner()
    out_csv, sheet = tmp_path / "r.csv", tmp_path / "s.png"
    res = r.invoke(cli, ["rerank", str(d), "-q", "a red shape", "--top", "5", "--json", "--csv", str(out_csv),
                         "--sheet", str(sheet), "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [x["rank"] for x in doc["results"]] == [1, 2, 3, 4, 5] and len(doc["skipped"]) == 4
    rows = list(csv.reader(open(out_csv)))
    assert rows[0] == ["rank", "score", "path"] and len(rows) == 6
    assert Image.open(sheet).size[0] > 300
    # warm: everything from the cache
    res = r.invoke(cli, ["rerank", str(d), "-q", "a circle", "--json", "--cache", str(tmp_path / "cache")])
    assert json.loads(res.stdout)["cached"] == 32
    res = r.invoke(cli, ["rerank", str(d), "-q", "a", "-q", "b", "--json", "--no-cache"])
    assert len(json.loads(res.stdout)["rankings"]) == 2
    res = r.invoke(cli, ["rerank", str(d / "zero.png"), "-q", "a red shape", "--no-cache"])
    assert res.exit_code == 2 and "could be read" in res.stderr
    texts = tmp_path / "t.txt"
    texts.write_text("a red shape\na blue shape\n")
    res = r.invoke(cli, ["rerank", str(d / "001.png"), "--texts", str(texts), "--json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)["results"]) == 2
