"""guidance/defaults.py: the profile's generate defaults, applied in one place (CLI, API, studio)."""
import pytest

from clipkit.core.errors import InputError
from clipkit.core.profiles import get_profile
from clipkit.guidance.defaults import apply_profile
from clipkit.shapes.profile import SHAPES


def test_the_profiles_defaults_on_its_own_model():
    s = apply_profile(SHAPES, "a red circle at the top left")
    assert (s.diffusion, s.clip, s.select) == ("shapes", "shapes-noised", "caption")
    o = s.options
    assert (o["steps"], o["best_of"], o["layout"], o["negative"]) == (25, 3, "grid", ["{prompt} and another shape:4"])
    # what the user gives wins; '' drops the profile's negatives; giving its own again does not double it
    s = apply_profile(SHAPES, "a red circle", best_of=1, layout="off", negative=[""], select="clip")
    assert (s.options["best_of"], s.options["layout"], s.options["negative"], s.select) == (1, "off", [], "clip")
    s = apply_profile(SHAPES, "a red circle", negative=["{prompt} and another shape:4", "a blue shape"])
    assert s.options["negative"] == ["{prompt} and another shape:4", "a blue shape"]
    # img2img: the profile's pair of CLIPs and 25 steps run at the strength
    s = apply_profile(SHAPES, "a green square", init_image="x.png", strength=0.5)
    assert s.clip == ["shapes-noised", "shapes"] and s.options["steps"] == 50
    # image prompts alone: an empty text prompt, selected by CLIP (the captioner needs a text)
    s = apply_profile(SHAPES, [], image_prompts=[["x.png", 1.0]])
    assert s.prompts == [""] and s.select == "clip"


def test_another_diffusion_model_gets_the_plain_defaults(tmp_path):
    s = apply_profile(SHAPES, "a church", diffusion=str(tmp_path))
    assert (s.select, s.options["best_of"], s.options["layout"], s.options["negative"]) == ("clip", 1, "off", [])
    assert get_profile("sd").select == "clip"


def test_a_prompt_the_models_cannot_know_stops_before_any_work():
    with pytest.raises(InputError, match="know none of its words.*--profile sd.*--force"):
        apply_profile(SHAPES, "astronaut riding a horse")
    assert apply_profile(SHAPES, "astronaut riding a horse", force=True).prompts == ["astronaut riding a horse"]
    apply_profile(SHAPES, "a shape")                     # a generic Shapes prompt is known
    apply_profile(SHAPES, "a black cat on the left")     # some known words: runs (with a warning in generate)
    with pytest.raises(InputError, match="give a prompt"):
        apply_profile(SHAPES, [])
