"""`clipkit index build|add|dedup|info` (with `clipkit search` on the result), one-line errors, the
--max-memory size option. Fixtures: tests/conftest.py (corpus, built), tests/cli/conftest.py (runner)."""
import csv
import json

import pytest

from clipkit.cli.main import cli

from helpers import assert_one_line_error   # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_build_search_outputs(runner, tmp_path, corpus):
    root, folder, shard, lst = corpus
    idx = tmp_path / "c.idx"
    cache = ["--cache", str(tmp_path / "cache")]
    res = runner.invoke(cli, ["-q", "index", "build", str(folder), str(shard), "--out", str(idx), "--json",
                              "--workers", "0"] + cache)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["items"] == 20 and doc["structure"] == "IVF1,SQfp16"
    res = runner.invoke(cli, ["search", str(idx), "-q", "a red circle", "--top", "3", "--json",
                              "--csv", str(tmp_path / "t.csv"), "--sheet", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)                          # stdout holds only the JSON document
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3] and doc["query"] == ["a red circle"]
    assert (tmp_path / "t.png").is_file()
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows[0] == ["rank", "score", "path"] and rows[1][2] == doc["results"][0]["path"]
    # existing outputs are refused before any work; --overwrite replaces them
    res = runner.invoke(cli, ["search", str(idx), "-q", "x", "--csv", str(tmp_path / "t.csv")])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
    res = runner.invoke(cli, ["search", str(idx), "-q", "x", "--csv", str(tmp_path / "t.csv"), "--overwrite"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["search", str(idx), "--query-image", str(folder / "img03.png"), "--top", "1"])
    assert res.exit_code == 0 and "img03.png" in res.output, res.output
    res = runner.invoke(cli, ["index", "add", str(idx), str(lst), "--json"] + cache)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["added"] == 2
    res = runner.invoke(cli, ["index", "dedup", str(idx), "--threshold", "0.999", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["groups"]
    res = runner.invoke(cli, ["index", "info", str(idx), "--json"])
    assert json.loads(res.stdout)["items"] == 22


@pytest.mark.parametrize("args, message", [
    (["index", "build", "{tmp}/none", "--out", "{tmp}/o.idx"], "no such file or folder"),
    (["index", "build", "{tmp}", "--out", "{tmp}/o.idx", "--max-memory", "lots"], "expected a size"),
    (["index", "build", "{tmp}", "--out", "{tmp}/o.idx", "--target-recall", "nan"], "not a finite number"),
    (["index", "build", "{tmp}", "--out", "{idx}"], "refusing to overwrite"),
    (["index", "dedup", "{idx}", "--threshold", "0"], "--threshold"),
])
def test_cli_errors_are_one_line_exit_2(runner, built, tmp_path, args, message):
    idx, _ = built
    args = [a.format(idx=idx, tmp=tmp_path) for a in args]
    assert_one_line_error(runner.invoke(cli, args), message)


def test_byte_size_option():
    import click

    from clipkit.cli.index import ByteSize
    b = ByteSize()
    assert b.convert("4GB", None, None) == 4 << 30 and b.convert("512m", None, None) == 512 << 20
    assert b.convert("1.5 GiB", None, None) == int(1.5 * 2 ** 30) and b.convert("1000", None, None) == 1000
    for bad in ("lots", "-1GB", "0", "4 parsecs"):
        with pytest.raises(click.BadParameter):
            b.convert(bad, None, None)
