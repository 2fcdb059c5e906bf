"""Reliability and security, round 3: a run folder is never replaced without --overwrite, a resumed run
keeps its settings, the embedding cache follows the weights, symlinked class folders count nothing
twice, no NaN reaches a score or a JSON document, ``embed`` fails like the others and is bit for bit,
weighted prompts reject what overflows, ``train`` draws no bars off a terminal.

Each check runs the real CLI (in-process through click's CliRunner, as ``faults.py`` does in the
suite; ``CLIPKIT_FAULTS_MODE=subprocess`` runs them as processes) and holds it to the contract: bad
input -> one line ``Error: ...``, exit 2, no traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

import faults
from faults import TINY_CLIP_CFG, make_images, one_line_error, snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _inprocess(monkeypatch):
    monkeypatch.setattr(faults, "MODE", os.environ.get("CLIPKIT_FAULTS_MODE", "inprocess"))


def cli(args, tmp):
    return faults.clipkit(args, tmp / "xdg")


def train_args(steps: int = 1) -> list:
    return ["train", "clip", "--steps", str(steps), "--batch-size", "4", "--lr", "0.001", "--save-every", "1",
            "--log-every", "1", "--eval-every", "1000"]


TRAIN = train_args(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 1-step ``train clip`` run (not -q: what it draws on a redirected stderr is checked)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    old = faults.MODE
    faults.MODE = os.environ.get("CLIPKIT_FAULTS_MODE", "inprocess")
    try:
        r = cli([*TRAIN, "--model-config", cfg, "--out", tmp / "run"], tmp)
    finally:
        faults.MODE = old
    assert r.rc == 0, r.err[-2000:]
    return tmp, cfg, r


def _copy_run(trained, tmp_path):
    src, cfg, _ = trained
    shutil.copytree(src / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "run", cfg


# ---------------------------------------------------------------------------------------------
# 1. train --out: an existing run is not replaced without --overwrite; a file is not a folder
# ---------------------------------------------------------------------------------------------

def test_train_refuses_to_replace_an_existing_run(trained, tmp_path):
    run, cfg = _copy_run(trained, tmp_path)
    before = snapshot(run)
    r = cli(["-q", *TRAIN, "--model-config", cfg, "--out", run], tmp_path)
    assert one_line_error(r), (r.rc, r.err[-1000:])
    line = r.err.strip()
    assert "\n" not in line and str(run) in line and "--resume" in line and "--overwrite" in line, line
    assert snapshot(run) == before                     # nothing touched: model, checkpoint, logs
    # the same refusal for the other trainers, before any work (a run folder holding their files)
    for kind, extra in (("diffusion", ["--steps", "1"]), ("captioner", ["--epochs", "1"])):
        r = cli(["-q", "train", kind, *extra, "--out", run], tmp_path)
        assert one_line_error(r) and "--overwrite" in r.err and str(run) in r.err, (kind, r.rc, r.err[-800:])
    assert snapshot(run) == before
    # --overwrite replaces it: a fresh run (its old checkpoint is gone, the new one is at step 1)
    r = cli(["-q", *TRAIN, "--model-config", cfg, "--out", run, "--overwrite"], tmp_path)
    assert r.rc == 0, r.err[-1000:]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 1
    log = (run / "train_log.csv").read_text().splitlines()
    assert len(log) == 2                                  # the header and the new run's one row


def test_train_out_that_is_a_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    for out in (f, f / "sub"):
        r = cli(["-q", *TRAIN, "--model-config", cfg, "--out", out], tmp_path)
        assert one_line_error(r), (out, r.rc, r.err[-1000:])
        assert str(f) in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert f.read_text() == "keep me"


def test_train_draws_no_progress_bars_off_a_terminal(trained):
    """The fixture's run was not -q, its stderr not a terminal: no tqdm bar in it (as other commands)."""
    _, _, r = trained
    assert "it/s" not in r.err and "s/it" not in r.err and "\r" not in r.err and "%|" not in r.err, r.err[-500:]


# ---------------------------------------------------------------------------------------------
# 2. --resume keeps the run's settings; a damaged checkpoint.old never breaks a save
# ---------------------------------------------------------------------------------------------

def test_resume_with_other_settings_says_what_differs(trained, tmp_path):
    run, cfg = _copy_run(trained, tmp_path)
    state = (run / "checkpoint" / "state.json").read_bytes()
    base = [*train_args(2), "--model-config", cfg, "--out", run, "--resume"]
    make_images(tmp_path / "caps", 2)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image": f"caps/{i:04d}.png", "caption": "a shape"})
                                                     + "\n" for i in range(2)))

    def changed(opt, value):
        args = list(base)
        if opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value]
        return args
    cases = {
        ("--lr", "0.01"): ["lr=0.001", "lr=0.01"],
        ("--batch-size", "2"): ["batch_size=4", "batch_size=2"],
        ("--seed", "3"): ["seed=0", "seed=3"],
        ("--data", str(tmp_path / "captions.jsonl")): ["data=shapes", "captions.jsonl"],
    }
    for (opt, value), want in cases.items():
        r = cli(["-q", *changed(opt, value)], tmp_path)
        assert one_line_error(r), (opt, r.rc, r.err[-1000:])
        line = r.err.strip()
        assert "\n" not in line and f"--resume {run} was started with" in line and "pass the same options" in line, line
        assert all(w in line for w in want), (opt, line)
    # two at once: both named
    args = changed("--lr", "0.01")
    args[args.index("--batch-size") + 1] = "2"
    r = cli(["-q", *args], tmp_path)
    assert one_line_error(r) and "lr=0.001, batch_size=4" in r.err and "lr=0.01, batch_size=2" in r.err, r.err
    # another model config: what differs, not "damaged: delete it"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_CLIP_CFG, "embed_dim": 16}))
    r = cli(["-q", *changed("--model-config", str(other))], tmp_path)
    assert one_line_error(r), r.err[-1000:]
    assert "model_cfg.embed_dim=32" in r.err and "model_cfg.embed_dim=16" in r.err, r.err
    assert "damaged" not in r.err and "delete" not in r.err, r.err
    assert (run / "checkpoint" / "state.json").read_bytes() == state     # never rewritten
    # the same options: it resumes
    r = cli(["-q", *base], tmp_path)
    assert r.rc == 0, r.err[-1000:]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2


@pytest.mark.parametrize("leftover", ["file", "symlink"])
def test_a_checkpoint_old_that_is_not_a_folder_never_breaks_a_save(trained, tmp_path, leftover):
    run, cfg = _copy_run(trained, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").mkdir()
    (outside / "victim" / "precious.txt").write_text("precious")
    old = run / "checkpoint.old"
    if leftover == "file":
        old.write_text("junk")
    else:
        os.symlink(outside / "victim", old)
    before = snapshot(outside)
    r = cli(["-q", *train_args(2), "--model-config", cfg, "--out", run, "--resume"], tmp_path)
    assert r.rc == 0, r.err[-1500:]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not os.path.lexists(old)
    assert snapshot(outside) == before


def test_recover_dir_never_restores_a_file_or_a_link(tmp_path):
    from clipkit.core.outputs import recover_dir
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "checkpoint.old")     # no checkpoint: not put back
    recover_dir(tmp_path / "checkpoint")
    assert not os.path.lexists(tmp_path / "checkpoint") and not os.path.lexists(tmp_path / "checkpoint.old")
    assert (tmp_path / "elsewhere").is_dir()


# ---------------------------------------------------------------------------------------------
# 3. the embedding cache is keyed by the weights, not the spec
# ---------------------------------------------------------------------------------------------

def test_cache_follows_the_weights_not_the_spec(tmp_path):
    from helpers import make_openclip_dir
    make_images(tmp_path / "imgs", 5)
    model = tmp_path / "model"
    args = ["-q", "rerank", tmp_path / "imgs", "-q", "a red circle", "--json", "--clip", model,
            "--workers", "0"]
    got = {}
    for seed in (0, 1):
        if model.exists():
            shutil.rmtree(model)
        make_openclip_dir(model, seed=seed)                       # same path, same width, other weights
        plain = cli([*args, "--no-cache"], tmp_path)
        cached = cli([*args, "--cache", tmp_path / "cache"], tmp_path)
        assert plain.rc == 0 and cached.rc == 0, (plain.err[-500:], cached.err[-500:])
        want = json.loads(plain.out)["results"]
        assert json.loads(cached.out)["results"] == want, seed
        got[seed] = want
    assert got[0] != got[1]
    # and the second run of a model reads its cache
    again = cli([*args, "--cache", tmp_path / "cache"], tmp_path)
    assert json.loads(again.out)["results"] == got[1] and json.loads(again.out)["cached"] == 5


# ---------------------------------------------------------------------------------------------
# 4. symlinked class folders and alias folders: nothing counted twice
# ---------------------------------------------------------------------------------------------

def test_eval_skips_class_folders_that_link_back_into_the_dataset(tmp_path):
    d = tmp_path / "d"
    make_images(d / "red", 2)
    make_images(d / "blue", 3, seed=1)
    os.symlink("..", d / "loop")              # the dataset's parent
    os.symlink(d, d / "self")                 # the dataset itself
    os.symlink("red", d / "alias")            # another class folder
    r = faults.clipkit(["eval", d, "--json"], tmp_path / "xdg")     # not -q: the warnings are the contract
    assert r.rc == 0, r.err[-1000:]
    doc = json.loads(r.out)
    assert doc["images"] == 5 and sorted(c["class"] for c in doc["classes"]) == ["blue", "red"], doc
    for name in ("loop", "self", "alias"):
        assert any(ln.startswith("warning:") and f"class folder {name}" in ln for ln in r.err.splitlines()), \
            (name, r.err)


def test_an_alias_folder_does_not_index_a_file_twice(tmp_path):
    make_images(tmp_path / "real", 3)
    os.symlink(tmp_path / "real", tmp_path / "alias")
    r = cli(["-q", "rerank", tmp_path / "real", tmp_path / "alias", "-q", "a red shape", "--json"], tmp_path)
    assert r.rc == 0, r.err[-500:]
    doc = json.loads(r.out)
    assert len(doc["results"]) == 3 and len({os.path.realpath(x["path"]) for x in doc["results"]}) == 3, doc


# ---------------------------------------------------------------------------------------------
# 5. no NaN score from --weights, no NaN token in JSON
# ---------------------------------------------------------------------------------------------

def test_combine_weights_that_overflow_are_a_one_line_error(tmp_path):
    make_images(tmp_path / "imgs", 3)
    base = ["-q", "rerank", tmp_path / "imgs", "-q", "a red shape", "-q", "a circle", "--json"]
    r = cli([*base, "--combine", "--weights", "1e308,1e308"], tmp_path)
    assert one_line_error(r) and "NaN" not in r.out, (r.rc, r.out[-300:], r.err[-500:])
    # large but summable weights: only their ratio matters
    big = cli([*base, "--combine", "--weights", "1e200,1e200"], tmp_path)
    one = cli([*base, "--combine", "--weights", "1,1"], tmp_path)
    assert big.rc == 0 and json.loads(big.out)["results"] == json.loads(one.out)["results"], big.err[-500:]


def test_emit_json_never_prints_nan(capsys):
    from clipkit.cli.common import emit_json
    emit_json({"score": float("nan"), "rows": [1.0, float("inf"), {"x": -float("inf")}], "ok": 0.5})
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert doc == {"score": None, "rows": [1.0, None, {"x": None}], "ok": 0.5}


# ---------------------------------------------------------------------------------------------
# 6. embed: nothing readable is an error; the file is bit for bit
# ---------------------------------------------------------------------------------------------

def test_embed_with_no_readable_file_is_a_one_line_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not an image")
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"")
    out = tmp_path / "e.safetensors"
    r = cli(["-q", "embed", tmp_path / "imgs", "--out", out, "--no-cache"], tmp_path)
    assert one_line_error(r), (r.rc, r.err[-500:])
    assert not out.exists() and not list(tmp_path.glob(".e.safetensors*"))


def test_embed_is_bit_for_bit(tmp_path):
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    blobs = []
    for k in range(3):
        out = tmp_path / f"e{k}.safetensors"
        r = cli(["-q", "embed", tmp_path / "imgs", "--out", out, "--no-cache", "--workers", "0"], tmp_path)
        assert r.rc == 0, r.err[-500:]
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    (n,) = struct.unpack("<Q", blobs[0][:8])
    meta = json.loads(blobs[0][8:8 + n])["__metadata__"]
    assert list(meta) == sorted(meta)


# ---------------------------------------------------------------------------------------------
# 7. weighted prompts: overflowing, non-finite and empty parts are errors
# ---------------------------------------------------------------------------------------------

def test_weighted_prompts_reject_overflow_nonfinite_and_empty_parts():
    from clipkit.core.errors import InputError
    from clipkit.core.objectives import PromptPart, negative_parts, parse_negative, parse_weighted_prompt
    for prompt, why in [("a red circle:1e308 | a square:1e308", "too large"),
                        ("a red circle:3e38 | a square:3e38", "too large"),
                        ("a red circle:nan", "finite"), ("a red circle:-inf", "finite"),
                        (" | ", "empty part"), ("|", "empty part"), ("a red circle | ", "empty part"),
                        ("a red circle |  | a square", "empty part")]:
        with pytest.raises(InputError, match=why):
            parse_weighted_prompt(prompt)
    for neg, why in [("x:nan", "finite"), ("x:inf", "finite"), ("x:1e308", "too large")]:
        with pytest.raises(InputError, match=why):
            parse_negative(neg)
    with pytest.raises(InputError, match="too large"):
        negative_parts(["a blue square:3e38"], parse_weighted_prompt("a red circle:3e38"))
    # what stays valid
    assert parse_weighted_prompt("a red circle:2 | a square:-1") == [PromptPart("a red circle", 2.0),
                                                                      PromptPart("a square", -1.0)]
    assert parse_weighted_prompt("a|b") == [PromptPart("a|b")] and parse_weighted_prompt("") == []
    assert parse_negative("a cat: the best") == PromptPart("a cat: the best", -1.0)


def test_generate_with_an_overflowing_prompt_is_a_one_line_error(tmp_path):
    for prompt in ("a red circle:1e308 | a square:1e308", " | "):
        r = cli(["-q", "generate", prompt, "-n", "1", "--steps", "2", "--out", tmp_path / "g"], tmp_path)
        assert one_line_error(r), (prompt, r.rc, r.err[-800:])
    r = cli(["-q", "generate", "a red circle", "--negative", "x:nan", "-n", "1", "--steps", "2",
             "--out", tmp_path / "g"], tmp_path)
    assert one_line_error(r) and "finite" in r.err, (r.rc, r.err[-800:])
    assert not list((tmp_path / "g").glob("*.json")) if (tmp_path / "g").exists() else True


@pytest.mark.parametrize("args,needle", [(["--size", "100000"], "size must be an integer from 8 to 4096"),
                                         (["--steps", "100000"], "at most 10000 steps"),
                                         (["--best-of", "100", "--drafts", "100"], "1024 trajectories")])
def test_generate_bounds_the_work_before_allocating(tmp_path, args, needle):
    from click.testing import CliRunner

    from clipkit.cli.main import cli
    res = CliRunner().invoke(cli, ["generate", "a red circle", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and needle in res.stderr and not (tmp_path / "o").exists()


def test_train_diffusion_init_with_pickled_weights_is_a_one_line_error(tmp_path):
    import torch
    from click.testing import CliRunner

    from clipkit.cli.main import cli
    unet = tmp_path / "pk" / "unet"
    unet.mkdir(parents=True)
    torch.save({"a": torch.zeros(2)}, unet / "diffusion_pytorch_model.bin")
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    res = CliRunner().invoke(cli, ["train", "diffusion", "--init", str(tmp_path / "pk"), "--out", str(tmp_path / "o"),
                                   "--steps", "1"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "safetensors" in lines[0] and str(tmp_path / "pk") in lines[0]
