"""Parameter types shared by the commands: values are rejected at parse time, on one line, exit 2."""
import os

import click
import pytest
from click.testing import CliRunner

from clipkit.cli.common import FiniteFloat, FloatList, ModelSpecType, fmt_table, scheduler_choice


def _cmd(**types):
    @click.command()
    @click.pass_context
    def cmd(ctx, **kw):
        click.echo(repr(sorted(kw.items())))
    for name, t in types.items():
        cmd = click.option(f"--{name}", type=t)(cmd)
    return cmd


def run(args, **types):
    return CliRunner().invoke(_cmd(**types), args)


@pytest.mark.parametrize("spec", ["shapes", "shapes-noised", "openclip:ViT-B-32/openai", "hf:org/name"])
def test_model_spec_accepts_good_specs_unchanged(spec):
    res = run(["--clip", spec], clip=ModelSpecType("clip"))
    assert res.exit_code == 0, res.output
    assert repr(spec) in res.output


@pytest.mark.parametrize("spec,needle", [("nonsense", "unknown model spec"),
                                         ("openclip:ViT-B-32", "expected openclip:ARCH/TAG"),
                                         ("hf:only-org", "expected hf:ORG/NAME"),
                                         ("./no/such/dir", "cannot load model")])
def test_model_spec_rejects_with_the_registry_message(spec, needle):
    from clipkit.cli.main import cli
    from clipkit.core.errors import ModelLoadError
    from clipkit.core.registry import parse_spec
    with pytest.raises(ModelLoadError, match=needle):
        ModelSpecType("clip").convert(spec, None, None)
    with pytest.raises(ModelLoadError) as e:
        parse_spec(spec, "clip")
    # through the real CLI: the registry's own line, exactly as a failed load prints it, before any work
    res = CliRunner().invoke(cli, ["generate", "a red circle", "--clip", spec])
    assert res.exit_code == 2 and res.output.strip() == f"Error: {e.value}"


def test_model_spec_checks_the_kind_of_model(tmp_path):
    from clipkit.core.errors import ModelLoadError
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        ModelSpecType("clip").convert(str(empty), None, None)
    with pytest.raises(ModelLoadError):
        ModelSpecType("captioner").convert(str(tmp_path / "nowhere"), None, None)
    assert run(["--diffusion", "shapes"], diffusion=ModelSpecType("diffusion")).exit_code == 0
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)                                      # never opened: a FIFO would block a loader
    with pytest.raises(ModelLoadError):
        ModelSpecType("captioner").convert(str(fifo), None, None)


def test_model_spec_loads_nothing():
    import subprocess
    import sys
    code = ("import sys; from clipkit.cli.common import ModelSpecType; "
            "ModelSpecType('clip').convert('openclip:ViT-B-32/openai', None, None); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_scheduler_choice():
    from clipkit.guidance.schedulers import SCHEDULER_NAMES
    assert run(["--s", "euler_a"], s=scheduler_choice()).exit_code == 0
    res = run(["--s", "heun"], s=scheduler_choice())
    assert res.exit_code == 2 and "'heun' is not one of" in res.output
    assert tuple(scheduler_choice().choices) == SCHEDULER_NAMES


def test_float_list_and_finite_float():
    assert "[2.0, 1.0, 0.5]" in run(["--w", "2,1,0.5"], w=FloatList(min=0)).output
    for bad, needle in [("2,x", "comma-separated numbers"), ("1,nan", "not a finite number"),
                        ("1,-1", "below 0")]:
        res = run(["--w", bad], w=FloatList(min=0))
        assert res.exit_code == 2 and needle in res.output, res.output
    for bad in ["nan", "inf", "-Infinity", "0"]:
        assert run(["--x", bad], x=FiniteFloat(min=0, min_open=True)).exit_code == 2
    assert run(["--x", "0.5"], x=FiniteFloat(min=0, min_open=True)).exit_code == 0


def test_fmt_table_aligns_columns():
    assert fmt_table(["a", "bb"], [["xxx", 1], ["y", 22]]).splitlines() == ["a    bb", "---  --", "xxx  1", "y    22"]
