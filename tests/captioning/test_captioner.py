"""The Captioner: decoding settings, result records, and the bundled model on Shapes renders."""
import pytest

from clipkit.captioning.captioner import CaptionResult, Candidate, decode_config
from clipkit.core.errors import InputError


@pytest.mark.parametrize("strategy,beams,candidates,want", [
    ("beam", 5, 1, 5), ("beam", 2, 4, 4),              # beam search widens to return every candidate
    ("greedy", 5, 1, 1), ("nucleus", 5, 8, 1)])        # the others decode one sequence at a time
def test_decode_config_beams(strategy, beams, candidates, want):
    cfg = decode_config(strategy, beams, candidates, max_length=6)
    assert (cfg.strategy, cfg.beams, cfg.candidates, cfg.max_length) == (strategy, want, candidates, 6)


def test_decode_config_is_validated():
    with pytest.raises(InputError, match="greedy"):
        decode_config("greedy", candidates=3)
    with pytest.raises(InputError, match="top_p"):
        decode_config("nucleus", top_p=0.0)


def test_caption_result_to_dict():
    one = CaptionResult("a red circle", 0.5, -0.25, source="a.png")
    assert one.to_dict() == {"path": "a.png", "caption": "a red circle", "score": 0.5, "logprob": -0.25}
    cands = [Candidate("a red circle", -0.25, 0.5, 0.475), Candidate("a circle", -0.5, 0.4, 0.35)]
    many = CaptionResult("a red circle", 0.5, -0.25, cands).to_dict()
    assert many["path"] is None
    assert many["candidates"] == [{"caption": "a red circle", "logprob": -0.25, "clip_score": 0.5,
                                   "rank_score": 0.475},
                                  {"caption": "a circle", "logprob": -0.5, "clip_score": 0.4, "rank_score": 0.35}]


def test_bundled_captioner_describes_single_object_scenes():
    """The bundled model on 24 test renders: every attribute right (its card reports 500 images)."""
    from clipkit.captioning.captioner import load_captioner
    from clipkit.captioning.decode import DecodeConfig
    from clipkit.shapes.data import single_object_scenes
    from clipkit.shapes.parse import caption_matches
    from clipkit.shapes.render import render_scenes
    scenes = single_object_scenes("test", 24, offset=7000)
    cap = load_captioner("shapes", device="cpu")
    res = cap.caption(render_scenes(scenes, 64), DecodeConfig(strategy="greedy"))
    exact = sum(caption_matches(r.caption, s)["exact"] for r, s in zip(res, scenes))
    assert exact >= 22


def test_end_logprob_sees_what_the_prompt_leaves_out():
    """The bundled captioner's log P(caption ends | image, prompt): one object named -> likely end;
    a second object the prompt does not name -> the captioner wants to go on."""
    import torch

    from clipkit.captioning.captioner import CaptionEndSelector, load_captioner
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import Scene, ShapeObject
    cap = load_captioner("shapes", device="cpu")
    red = ShapeObject("circle", "red", "large", "top left")
    x = render_scenes([Scene((red,)), Scene((red, ShapeObject("square", "blue", "small", "bottom right")))])
    prompt = "a red circle at the top left"
    end = cap.end_logprob(x, [prompt] * 2)
    assert end[0] > -2.0 and end[1] < end[0] - 5
    total = cap.text_logprob(x, [prompt] * 2)
    per_token = cap.token_logprobs(x, [prompt] * 2)
    assert torch.allclose(total, torch.stack([t.sum() for t in per_token])) and (total < 0).all()
    assert torch.equal(end, torch.stack([t[-1] for t in per_token]))
    sel = CaptionEndSelector(cap, weight=0.5)
    scores = sel(x, prompt, torch.tensor([0.2, 0.3]))
    assert torch.allclose(scores, torch.tensor([0.2, 0.3]) + 0.5 * end) and scores[0] > scores[1]
    with pytest.raises(InputError, match="one text per image"):
        cap.end_logprob(x, [prompt])
