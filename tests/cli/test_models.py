"""`clipkit models`: the profiles and model specs it lists."""
import json

from clipkit.cli.main import cli


def test_models_json(runner):
    res = runner.invoke(cli, ["models", "--json"])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert {"shapes", "sd"} <= set(doc["profiles"])
    assert any(m["spec"] == "shapes" and m["available"] for m in doc["models"])
