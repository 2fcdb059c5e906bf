"""`clipkit generate` with the bundled Shapes models: PNGs + sidecars + JSON, --select, never overwriting
silently, one-line errors, warnings, --guide-target, a real subprocess. (The latent/SD backend's CLI
runs are in tests/guidance/test_generate_latent.py.)"""
import json
import math

import pytest
from click.testing import CliRunner

from clipkit.cli.main import cli

pytestmark = pytest.mark.usefixtures("one_thread")     # as every guidance test (tests/guidance/conftest.py)

PROMPT = "a red circle at the top left"


def run(args):
    res = CliRunner().invoke(cli, args)
    return res


def test_cli_writes_png_and_sidecar_and_json(tmp_path):
    from clipkit.core.scorer import load_scorer
    noised_scorer = load_scorer("shapes-noised", device="cpu")
    out = tmp_path / "out"
    res = run(["generate", PROMPT, "-n", "2", "--steps", "3", "--seed", "7", "--best-of", "1", "--out", str(out),
               "--negative", "", "--json"])           # '' drops the profile's negative: the plain cosine
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)                                  # one JSON document, nothing else
    assert doc["score"] == "cosine" and doc["models"]["diffusion"] == "shapes"
    assert "note: using the bundled" in res.stderr
    slug = "a-red-circle-at-the-top-left"
    assert sorted(p.name for p in out.iterdir()) == [f"{slug}-7.json", f"{slug}-7.png", f"{slug}-8.json",
                                                     f"{slug}-8.png"]
    assert sorted(im["seed"] for im in doc["images"]) == [7, 8]
    for im in doc["images"]:
        side = json.loads((out / f"{slug}-{im['seed']}.json").read_text())
        assert side["prompt"] == PROMPT and side["seed"] == im["seed"] and side["score"] == "cosine"
        # the bundled profile guides with the noise-aware overlay CLIP, on x_t ("auto" target)
        assert side["models"] == {"clip": "shapes-noised", "diffusion": "shapes", "diffusion_kind": "pixel"}
        p = side["parameters"]
        assert p["guide_target"] == "xt" and p["guidance"]["target"] == "xt"
        assert (p["steps"], p["n"], p["seed"], p["best_of"], p["scheduler"], p["clip_scale"]) == (3, 2, 7, 1, "ddim", 0.2)
        assert p["guidance"]["x0_step"] == 0.2 and p["cfg_scale"] is None and "strength" not in p
        # the sidecar's score is what `clipkit score --clip shapes-noised` reports for the saved file
        sim = float(noised_scorer.similarity([im["path"]], [PROMPT])[0, 0])
        assert math.isclose(side["clip_score"], sim, abs_tol=1e-5) and im["clip_score"] == side["clip_score"]


def test_cli_select_caption(tmp_path):
    res = run(["-q", "generate", PROMPT, "-n", "1", "--best-of", "2", "--steps", "2", "--seed", "3",
               "--select", "caption", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    im, = json.loads(res.stdout)["images"]
    side = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert side["selection"] == "caption" and math.isclose(side["selection_score"], im["selection_score"])
    assert side["selection_weight"] == 0.05 and side["models"]["selector"] == "shapes"
    assert im["selection_score"] < im["clip_score"]               # cosine + weight * (log-prob < 0)
    # --select with --best-of 1: nothing to choose, and the user is told so
    res = run(["generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--select", "caption",
               "--best-of", "1", "--out", str(tmp_path / "one")])
    assert res.exit_code == 0 and "nothing to choose" in res.stderr


def test_cli_default_is_the_profiles_best_of_3_by_caption(tmp_path):
    """No flags on the bundled profile: 3 candidates per image, kept by cosine + the captioner's end
    term (strict 78/100 held out vs 44/100 for one sample, BENCHMARKS.md); another diffusion model
    keeps best-of-1 by CLIP."""
    res = run(["-q", "generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (im,) = doc["images"]
    side = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["candidates"] == 3 and side["parameters"]["best_of"] == 3 and 3 <= im["seed"] <= 5
    assert side["selection"] == "caption" and side["models"]["selector"] == "shapes"
    # and the profile's count guard: pushed from "PROMPT and another shape" (strength 4), so the
    # score is the weighted one, labelled as such
    assert side["parameters"]["negative"] == ["{prompt} and another shape:4"]
    assert side["score"] == doc["score"] == "weighted" and "hinge" in side["score_note"]
    # a user's negative adds to it; --negative '' drops it
    res = run(["-q", "generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1", "--out",
               str(tmp_path / "a"), "--negative", "a blue shape:2", "--json"])
    assert res.exit_code == 0, res.output
    side = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    assert side["parameters"]["negative"] == ["{prompt} and another shape:4", "a blue shape:2"]
    res = run(["-q", "generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1", "--out",
               str(tmp_path / "b"), "--negative", "", "--negative", "a blue shape", "--json"])
    side = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert side["parameters"]["negative"] == ["a blue shape"]
    # the profile's own negative given again is not doubled
    res = run(["-q", "generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1", "--out",
               str(tmp_path / "c"), "--negative", "{prompt} and another shape:4", "--json"])
    side = json.loads(next((tmp_path / "c").glob("*.json")).read_text())
    assert side["parameters"]["negative"] == ["{prompt} and another shape:4"]
    # a negative's strength is a magnitude: a one-line error before anything loads
    res = run(["generate", PROMPT, "--negative", "a blue shape:-2"])
    assert res.exit_code == 2 and "STRENGTH must be > 0" in res.stderr


def test_cli_layout_is_the_profiles_on_its_own_model(tmp_path):
    """The bundled profile guides a prompt of placed objects object by object (--layout grid); --layout off
    guides it as one text; both are recorded, and the score says which it is."""
    two = "a red circle at the top left and a blue square on the right"
    base = ["-q", "generate", two, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1", "--json"]
    res = run([*base, "--out", str(tmp_path / "grid"), "--negative", ""])       # no count guard: only the layout
    assert res.exit_code == 0, res.output
    side = json.loads(next((tmp_path / "grid").glob("*.json")).read_text())
    assert side["parameters"]["layout"] == "grid" and side["score"] == "weighted"
    assert [o["position"] for o in side["layout"]] == ["top left", "right"]
    res = run([*base, "--out", str(tmp_path / "off"), "--layout", "off", "--negative", ""])
    assert res.exit_code == 0, res.output
    side = json.loads(next((tmp_path / "off").glob("*.json")).read_text())
    assert side["parameters"]["layout"] == "off" and side["score"] == "cosine" and "layout" not in side
    # asked for where it does not apply: said, and the prompt guides as one text
    res = run(["generate", "a red circle on the left", "-n", "1", "--steps", "2", "--seed", "3", "--best-of",
               "1", "--layout", "grid", "--out", str(tmp_path / "one")])
    assert res.exit_code == 0 and "--layout grid: 'a red circle on the left' guides as one text" in res.stderr
    # the profile's grid on a prompt of placed objects that cutouts keep whole: said too
    res = run(["generate", two, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1", "--cutouts", "1",
               "--out", str(tmp_path / "cut")])
    assert res.exit_code == 0 and "guides as one text: a crop (cutouts)" in res.stderr
    res = run(["generate", "a red circle on the left", "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1",
               "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0 and "--layout grid" not in res.stderr       # nothing to place: nothing said
    res = run(["generate", two, "--layout", "boxes"])
    assert res.exit_code == 2 and "--layout" in res.stderr


def test_cli_never_overwrites_silently_and_takes_the_next_free_name(tmp_path):
    out = tmp_path / "o"
    args = ["-q", "generate", PROMPT, "-n", "2", "--steps", "2", "--seed", "3", "--best-of", "1", "--out", str(out)]
    assert run(args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = run(args)                                  # the same run again: -2 names, nothing replaced
    assert res.exit_code == 0, res.output
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == [f"a-red-circle-at-the-top-left-{s}-2.{e}" for s in (3, 4)
                                                 for e in ("json", "png")]
    from PIL import Image                            # the same image (its sidecar chunk names its own file)
    assert Image.open(out / "a-red-circle-at-the-top-left-3-2.png").tobytes() == \
        Image.open(out / "a-red-circle-at-the-top-left-3.png").tobytes()
    # a stray sidecar takes its name too (seed 9): the PNG goes to the next free name
    (out / "a-red-circle-at-the-top-left-9.json").write_text("{}")
    res = run(["-q", "generate", PROMPT, "-n", "2", "--steps", "2", "--seed", "8", "--best-of", "1", "--out", str(out)])
    assert res.exit_code == 0
    assert (out / "a-red-circle-at-the-top-left-9-2.png").exists() and (out / "a-red-circle-at-the-top-left-9.json").read_text() == "{}"
    res = run(args[:1] + ["generate", "--overwrite"] + args[2:] + ["--clip-scale", "0"])
    assert res.exit_code == 0, res.output
    side = json.loads((out / "a-red-circle-at-the-top-left-3.json").read_text())
    assert side["parameters"]["clip_scale"] == 0


def test_an_output_name_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "o"
    assert run(["-q", "generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1",
                "--out", str(out)]).exit_code == 0
    png = out / "a-red-circle-at-the-top-left-3.png"
    before = png.read_bytes()
    res = run(["-q", "generate", PROMPT, "-n", "1", "--steps", "2", "--seed", "3", "--best-of", "1", "--out", str(out),
               "--init-image", str(png), "--overwrite"])
    assert res.exit_code == 2 and "is one of the inputs" in res.stderr and png.read_bytes() == before


@pytest.mark.parametrize("bad", [
    ["", "--steps", "2"], ["   "], [PROMPT, "--steps", "0"], [PROMPT, "--steps", "-3"],
    [PROMPT, "--clip-scale", "-1"], [PROMPT, "--clip-scale", "nan"], [PROMPT, "--cfg-scale", "nan"],
    [PROMPT, "--cfg-scale", "7.5"], [PROMPT, "--scheduler", "heun"], [PROMPT, "-n", "0"],
    [PROMPT, "--best-of", "0"], [PROMPT, "--cutouts", "-1"], [PROMPT, "--scheduler", "pndm", "--steps", "3"],
    # guidance v2 controls: every one validated before a model loads
    [PROMPT, "--image-prompt", "missing.png"], [PROMPT, "--image-prompt", "x.png:nan"], [PROMPT, "--init-image", "."],
    [PROMPT, "--strength", "0"], [PROMPT, "--strength", "1.5"], [PROMPT, "--strength", "nan"],
    [PROMPT, "--tv-scale", "-1"], [PROMPT, "--sat-scale", "inf"], [PROMPT, "--range-scale", "nan"],
    [PROMPT, "--cut-schedule", "4+x"], [PROMPT, "--cut-schedule", "0+4"], [PROMPT, "--clip-weights", "1,2"],
    [PROMPT, "--clip-weights", "nan"], [PROMPT, "--drafts", "0"], [PROMPT, "--negative", "a red shape:0"],
    [PROMPT, "--scorer", "aesthetic:missing.pth"], [PROMPT, "--scorer", "shapes"], [PROMPT, "--scorer", "aesthetic:x.pth:0"],
    ["a red circle:-1"], ["a red circle:2 | :3"], [],
])
def test_cli_bad_input_exit_2_nothing_written(tmp_path, bad):
    out = tmp_path / "o"
    res = run(["-q", "generate", *bad, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert not out.exists()


def test_cli_unwritable_out(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        res = run(["-q", "generate", PROMPT, "--steps", "2", "--out", str(out)])
        assert res.exit_code == 2 and res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "x"


def test_cli_unknown_words_warning(tmp_path):
    res = run(["generate", "a dog on the beach", "-n", "1", "--steps", "1", "--seed", "0", "--best-of", "1",
               "--out", str(tmp_path / "o"), "--force"])        # no known word: --force runs it, with the warning
    assert res.exit_code == 0, res.output
    assert "'dog', 'beach'" in res.stderr and "--profile sd" in res.stderr and "--clip" in res.stderr
    assert (tmp_path / "o" / "a-dog-on-the-beach-0.png").is_file()
    assert "image" in res.stdout and "a-dog-on-the-beach-0.png" in res.stdout


def test_real_subprocess(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "clipkit", "generate", "a green square", "-n", "1", "--steps", "2",
                          "--seed", "11", "--out", str(tmp_path), "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # the default: best of 3 candidates (seeds 11-13), kept by cosine + the captioner
    assert doc["images"][0]["path"] in [str(tmp_path / f"a-green-square-{s}.png") for s in (11, 12, 13)]
    assert "note: using the bundled" in out.stderr


def test_cli_guide_target_xt_is_recorded_and_changes_the_image(tmp_path):
    """--guide-target xt: the CLIP sees x_t (noise-aware mode); same seed, different image from x0."""
    outs = {}
    for target in ("x0", "xt"):
        out = tmp_path / target
        res = run(["-q", "generate", PROMPT, "-n", "1", "--steps", "4", "--seed", "5", "--best-of", "1",
                   "--out", str(out), "--guide-target", target])
        assert res.exit_code == 0, res.output
        side = json.loads(next(out.glob("*.json")).read_text())
        assert side["parameters"]["guide_target"] == target
        assert side["parameters"]["guidance"]["target"] == target
        outs[target] = next(out.glob("*.png")).read_bytes()
    assert outs["x0"] != outs["xt"]


def test_cli_default_validates_before_loading_the_captioner(tmp_path, monkeypatch):
    """The profile's default selector (caption) loads its model only when it first ranks."""
    import clipkit.captioning.captioner as cap
    monkeypatch.setattr(cap, "load_captioner", lambda *a, **k: pytest.fail("the captioner was loaded"))
    for bad in (["--steps", "0"], ["--negative", "a red shape:0"], ["--clip-scale", "-1"]):
        res = run(["-q", "generate", PROMPT, *bad, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and res.stderr.startswith("Error: "), res.output
    # an explicit --diffusion naming the profile's own model keeps the profile's defaults
    res = run(["-q", "generate", PROMPT, "--best-of", "1", "--steps", "1", "--seed", "0", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0 and "nothing to choose" not in res.stderr, res.output


def test_cli_init_image_defaults_on_the_bundled_profile(tmp_path):
    """--init-image without --clip/--steps on the profile's own model: the profile's img2img CLIPs
    (shapes-noised + shapes, both on x_t) and a 25/strength schedule, so that 25 steps run."""
    from PIL import Image
    init = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(init)
    res = run(["-q", "generate", "a green square at the bottom right", "-n", "1", "--best-of", "1", "--seed", "0",
               "--init-image", str(init), "--strength", "0.8", "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    side = json.loads(next((tmp_path / "o").glob("*.json")).read_text())
    assert side["models"]["clip"] == ["shapes-noised", "shapes"]
    p = side["parameters"]
    # 32 steps at strength 0.8: int(32 * 0.8) = 25 run (31 would run 24)
    assert p["steps"] == 32 and p["strength"] == 0.8 and p["guide_target"] == "xt"
    # --clip-weights count the profile's img2img CLIPs
    res = run(["generate", "a green square", "--init-image", str(init), "--clip-weights", "1"])
    assert res.exit_code == 2 and "1 clip weights for 2 CLIP(s) (shapes-noised, shapes)" in res.stderr
    # an explicit --clip / --steps wins
    res = run(["-q", "generate", "a green square", "-n", "1", "--best-of", "1", "--seed", "0", "--steps", "4",
               "--init-image", str(init), "--clip", "shapes", "--out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    side = json.loads(next((tmp_path / "p").glob("*.json")).read_text())
    assert side["models"]["clip"] == "shapes" and side["parameters"]["steps"] == 4


def test_cli_warns_when_a_prompt_negative_has_no_prompt(tmp_path):
    """A user's {prompt} negative on an image-prompt-only run is left out, and the user is told so
    (the profile's own count guard is left out silently)."""
    from PIL import Image
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(ref)
    args = ["generate", "--image-prompt", str(ref), "-n", "1", "--best-of", "1", "--steps", "1", "--seed", "0"]
    res = run([*args, "--out", str(tmp_path / "a"), "--negative", "{prompt} and a square"])
    assert res.exit_code == 0 and "needs a text prompt" in res.stderr, res.output
    res = run([*args, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "needs a text prompt" not in res.stderr, res.output


def test_a_prompt_the_bundled_models_cannot_know_exits_2_before_sampling(tmp_path):
    res = run(["generate", "astronaut riding a horse", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and not (tmp_path / "o").exists()
    assert "know none of its words" in res.output and "--profile sd" in res.output and "--force" in res.output
