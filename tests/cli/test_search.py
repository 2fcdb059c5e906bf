"""`clipkit search`: one-line errors, a real subprocess. Fixtures: tests/conftest.py (built),
tests/cli/conftest.py (runner)."""
import json
import subprocess
import sys

import pytest

from clipkit.cli.main import cli

from helpers import assert_one_line_error   # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("args, message", [
    (["search", "{idx}"], "give --query TEXT or --query-image IMG"),
    (["search", "{idx}", "-q", "a", "--query-image", "x.png"], "exactly one"),
    (["search", "{idx}", "-q", "a", "--top", "0"], "--top"),
    (["search", "{idx}", "-q", "a", "--clip", "openclip:ViT-B-32/laion2b_s34b_b79k"], "was built with CLIP 'shapes'"),
    (["search", "{tmp}", "-q", "a"], "not a clipkit index"),
    (["search", "{idx}", "--query-image", "{tmp}/none.png"], "no such file"),
])
def test_cli_errors_are_one_line_exit_2(runner, built, tmp_path, args, message):
    idx, _ = built
    args = [a.format(idx=idx, tmp=tmp_path) for a in args]
    assert_one_line_error(runner.invoke(cli, args), message)


def test_real_subprocess(built):
    idx, _ = built
    out = subprocess.run([sys.executable, "-m", "clipkit", "-q", "search", str(idx), "-q", "a green square",
                          "--top", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["results"]) == 2
