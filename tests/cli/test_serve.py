"""`clipkit serve`: one-line errors, a real server process stopped by SIGINT."""
import json

import pytest

from clipkit.cli.main import cli

from helpers import assert_one_line_error   # tests/ is on sys.path (conftest.py)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("args, message", [
    (["serve", "{tmp}"], "not a clipkit index"),
])
def test_cli_errors_are_one_line_exit_2(runner, built, tmp_path, args, message):
    idx, _ = built
    args = [a.format(idx=idx, tmp=tmp_path) for a in args]
    assert_one_line_error(runner.invoke(cli, args), message)


def test_serve_real_subprocess(built):
    """`clipkit serve` in its own process: it says where it listens, answers, and stops on SIGINT."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.request
    idx, _ = built
    # a test run started in the background (`cmd &` in a script) ignores SIGINT, and children inherit
    # that: give the server the default disposition, as a terminal would
    p = subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "serve", str(idx), "--port", "0",
                          "--captioner", "none"], stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/api/info", timeout=30) as r:
            info = json.loads(r.read())
        assert info["items"] == 22 and info["captioner"] is None
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=90)                 # a torch process can take a while to exit on a busy machine
        assert rc == 0, p.stderr.read()[-2000:]


def test_close_is_bounded_when_a_request_hangs(monkeypatch):
    """A request thread that never ends cannot keep `clipkit serve` alive after Ctrl-C."""
    import threading

    from clipkit.cli import serve
    stop = threading.Event()
    exits = []

    class Stuck:
        def server_close(self):
            stop.wait(30)
    monkeypatch.setattr("os._exit", lambda code: exits.append(code))
    serve.close_bounded(Stuck(), timeout_s=0.2)
    stop.set()
    assert exits == [0]
