"""`clipkit serve` without an index: the studio in a real process, one-line errors (a port in use)."""
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from click.testing import CliRunner

from clipkit.cli.main import cli

from helpers import assert_one_line_error   # tests/ is on sys.path (conftest.py)


def test_a_port_in_use_exits_2_with_one_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        res = CliRunner().invoke(cli, ["-q", "serve", "--port", str(port), "--out", str(tmp_path / "out")])
    finally:
        s.close()
    assert_one_line_error(res, f"port {port} is in use")


@pytest.mark.parametrize("args, message", [
    (["serve", "--out", "{file}"], "is a file"),
    (["serve", "--captioner", "nope:x"], "nope"),
    (["serve", "--diffusion", "nope:x"], "nope"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "f").write_text("x")
    res = CliRunner().invoke(cli, ["-q"] + [a.format(file=tmp_path / "f") for a in args] + ["--port", "0"])
    assert_one_line_error(res, message)


def test_studio_real_subprocess(tmp_path):
    """`clipkit serve` with no INDEX: the studio; it says where it listens, answers, stops on SIGINT."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "serve", "--port", "0", "--out", str(out)],
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/api/info", timeout=60) as r:
            info = json.loads(r.read())
        assert info["tabs"] == ["generate", "gallery", "caption", "rerank"]
        assert info["studio"]["captioner"] == "shapes" and not out.exists()      # made at the first write
        req = urllib.request.Request(f"http://127.0.0.1:{m.group(1)}/api/info", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 421
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=90)
        assert rc == 0, p.stderr.read()[-2000:]
