"""The public API (``clipkit.__all__``): every name resolves, to the same object every time (also
after its modules are imported: a subpackage must not shadow a lazy name, as ``clipkit.rerank``
once did), and ``import clipkit`` stays free of torch."""
import importlib
import json
import pathlib
import importlib.util
import subprocess
import sys
import textwrap

import pytest

import clipkit


def test_every_public_name_resolves_twice_to_one_usable_object():
    assert sorted(dir(clipkit)) == sorted(clipkit.__all__)
    first = {}
    for name in clipkit.__all__:
        obj = getattr(clipkit, name)
        assert getattr(clipkit, name) is obj, name
        if name == "__version__":
            assert isinstance(obj, str) and obj
        elif name[:1].isupper():                        # ClipScorer, Captioner, the errors
            assert isinstance(obj, type), name
        else:
            assert callable(obj), name
        first[name] = obj
    # importing the modules behind the names (and a subpackage named like one) must not rebind any name
    for name, obj in first.items():
        if getattr(obj, "__module__", None):
            importlib.import_module(obj.__module__)
        if importlib.util.find_spec(f"clipkit.{name}") is not None:
            importlib.import_module(f"clipkit.{name}")
    assert {n: getattr(clipkit, n) for n in clipkit.__all__} == first
    assert all(getattr(clipkit, n) is first[n] for n in clipkit.__all__)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        clipkit.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """Six one-object Shapes renders (as tests/conftest.py's rerank_folder, without the bad files)."""
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import sample_scene, split_seed
    d = tmp_path_factory.mktemp("api_cands")
    scenes = [sample_scene(split_seed("test", i), n_objects=1) for i in range(6)]
    for i, im in enumerate(render_pil(scenes, 64)):
        im.save(d / f"{i:03d}.png")
    return d


def _order(res):
    return [(r.path, round(r.score, 5)) for r in res.results]


def test_rerank_is_callable_every_time(small_folder, shapes_scorer):
    one = clipkit.rerank([small_folder], "a red shape", shapes_scorer)
    two = clipkit.rerank([small_folder], "a red shape", shapes_scorer)
    rank = importlib.import_module("clipkit.rerank.rank")      # (`import clipkit.x` would make clipkit local)
    three = clipkit.rerank([small_folder], "a red shape", shapes_scorer)
    assert len(one.results) == 6 and _order(one) == _order(two) == _order(three)
    assert clipkit.rerank.rerank is rank.rerank      # the subpackage keeps its names


def test_rerank_is_callable_in_a_fresh_interpreter(small_folder):
    """The order that broke: the first call imports the subpackage, which used to rebind the name."""
    code = textwrap.dedent(f"""
        import clipkit
        from clipkit.core.scorer import load_scorer
        s = load_scorer("shapes", device="cpu")
        first = clipkit.rerank
        runs = [clipkit.rerank([{str(small_folder)!r}], "a red shape", s) for _ in range(2)]
        import clipkit.rerank.rank
        runs.append(clipkit.rerank([{str(small_folder)!r}], "a red shape", s))
        assert clipkit.rerank is first
        orders = [[r.path for r in res.results] for res in runs]
        assert len(orders[0]) == 6 and orders[0] == orders[1] == orders[2], orders
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_import_clipkit_does_not_import_torch():
    code = "import sys, clipkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# clipkit.generate: the CLI's defaults, the CLI's bytes
# --------------------------------------------------------------------------------------------

def test_generate_with_defaults_writes_the_clis_bytes(tmp_path):
    """``clipkit.generate`` applies the profile's defaults itself (best-of 3 by the captioner, the layout
    grid, the count guard): its PNGs equal ``clipkit generate``'s byte for byte."""
    from click.testing import CliRunner

    from clipkit.cli.main import cli
    prompt = "a red circle at the top left"
    res = CliRunner().invoke(cli, ["-q", "generate", prompt, "-n", "1", "--seed", "3", "--steps", "8",
                                   "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    api = clipkit.generate(prompt, n=1, seed=3, steps=8, out_dir=tmp_path / "api")
    cli_pngs = sorted((tmp_path / "cli").glob("*.png"))
    assert [p.name for p in cli_pngs] == [pathlib.Path(im.path).name for im in api.images]
    for p, im in zip(cli_pngs, api.images):
        assert p.read_bytes() == pathlib.Path(im.path).read_bytes()
    side = json.loads(pathlib.Path(api.images[0].sidecar).read_text())
    params = side["parameters"]
    assert (params["best_of"], params["layout"], side["selection"]) == (3, "grid", "caption")
    assert params["negative"] == ["{prompt} and another shape:4"] and side["models"]["clip"] == "shapes-noised"


def test_generate_reports_previews_each_image_and_cancels_within_a_step():
    previews, images, steps = [], [], []
    res = clipkit.generate("a blue square", n=1, seed=0, steps=6, best_of=1, on_preview=previews.append,
                           preview_every=2, on_image=images.append, on_step=lambda d, t: steps.append((d, t)))
    assert steps == [(i, 6) for i in range(1, 7)]
    assert [p.step for p in previews] == [2, 4, 6] and all(p.image.size == (32, 32) for p in previews)
    assert previews[-1].image.tobytes() == res.images[0].image.tobytes()       # the last preview is the image
    assert images == res.images
    done = []

    def on_step(d, t):
        done.append(d)
    with pytest.raises(clipkit.ClipkitError, match="cancelled after 2 of"):
        clipkit.generate("a blue square", n=1, seed=0, steps=6, on_step=on_step, cancel=lambda: len(done) >= 2)
    assert done == [1, 2]                                          # stopped at the step it was asked
