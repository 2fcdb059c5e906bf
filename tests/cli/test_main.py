"""The entry point: global options, every command's --help, one-line errors and exit codes, a real
subprocess run, and --help without torch."""
import json
import subprocess
import sys

import pytest

from clipkit.cli.main import COMMANDS, cli


@pytest.mark.parametrize("args", [[]] + [[c] for c in COMMANDS] + [["train", "clip"], ["train", "diffusion"]])
def test_every_help(runner, args):
    res = runner.invoke(cli, args + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


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


def _commands(group, path=()):
    import click
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))


def test_every_option_of_every_command_says_what_it_does():
    """Walk every command: each option has help text, no doubled brackets ("[default: x].  [0<x<=1]")."""
    import click
    bare, doubled = [], []
    for path, cmd in [((), cli), *_commands(cli)]:
        ctx = click.Context(cmd, info_name=" ".join(("clipkit",) + path))
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                if not (p.help or "").strip():
                    bare.append(f"{' '.join(path) or 'clipkit'} {p.opts[-1]}")
                rec = p.get_help_record(ctx)
                if rec and "].  [" in rec[1]:
                    doubled.append(f"{' '.join(path)} {p.opts[-1]}: {rec[1]}")
    assert not bare, "options without help text:\n" + "\n".join(bare)
    assert not doubled, "doubled brackets:\n" + "\n".join(doubled)
