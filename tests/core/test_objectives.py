"""core/objectives.py: the differentiable image-objective protocol (DESIGN §6)."""
import os

import pytest
import torch

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.core import objectives as ob

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorer():
    from clipkit.core.scorer import load_scorer
    return load_scorer("shapes", device="cpu")


@pytest.fixture(scope="module")
def renders():
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import Scene, ShapeObject
    red = Scene((ShapeObject("circle", "red", "large", "top left"),))
    blue = Scene((ShapeObject("square", "blue", "large", "bottom right"),))
    return render_scenes([red, blue])


def test_weighted_prompt_syntax():
    P = ob.PromptPart
    assert ob.parse_weighted_prompt("a red circle:2 | a square : -1.5") == [P("a red circle", 2.0), P("a square", -1.5)]
    assert ob.parse_weighted_prompt("a cat: the best") == [P("a cat: the best", 1.0)]   # not a number: text
    assert ob.parse_weighted_prompt("") == [] and ob.parse_weighted_prompt("  ") == []
    with pytest.raises(InputError, match="empty part"):
        ob.parse_weighted_prompt(" | ")
    assert ob.parse_weighted_prompt("a|b") == [P("a|b", 1.0)]                            # parts need " | "
    with pytest.raises(InputError, match="no text"):
        ob.parse_weighted_prompt(":2")
    with pytest.raises(InputError, match="finite"):
        ob.parse_weighted_prompt("x:1e999")
    assert ob.parse_weighted_path("img.png:0.5") == ("img.png", 0.5)
    assert ob.parse_weighted_path("img.png") == ("img.png", 1.0)


def test_clip_text_is_the_scorers_spherical_loss(scorer, renders):
    obj = ob.clip_text(scorer, ["a red circle"])
    loss = obj(renders)
    ref = scorer.loss_and_grad(renders, ["a red circle"]).loss
    assert torch.allclose(loss, ref, atol=1e-6)
    assert loss[0] < loss[1]                                  # the red circle is closer to its text
    cos = obj.cosine(renders)
    assert torch.allclose(cos, scorer.similarity(renders, ["a red circle"])[:, 0], atol=1e-5)


def test_gradient_flows_to_pixels(scorer, renders):
    x = renders.clone().requires_grad_(True)
    ob.clip_text(scorer, ["a red circle"])(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weighted_sum_and_negative_weights(scorer, renders):
    a, b = ob.clip_text(scorer, ["a red circle"]), ob.clip_text(scorer, ["a blue square"])
    w = ob.Weighted([(1.0, a), (-0.5, b)])
    assert torch.allclose(w(renders), a(renders) - 0.5 * b(renders), atol=1e-6)
    assert torch.equal(ob.Weighted([])(renders), torch.zeros(2))
    with pytest.raises(InputError):
        ob.Weighted([(float("nan"), a)])
    # weights inside one target: 2 texts weighted 3:1
    t = ob.clip_text(scorer, ["a red circle", "a blue square"], weights=[0.75, 0.25])
    assert torch.allclose(t(renders), 0.75 * a(renders) + 0.25 * b(renders), atol=1e-6)
    with pytest.raises(InputError, match="2 finite weights"):
        ob.clip_text(scorer, ["x", "y"], weights=[1.0])


def test_image_prompt_prefers_the_prompt_image(scorer, renders):
    obj = ob.clip_image(scorer, renders[:1])
    loss = obj(renders)
    assert loss[0] < 1e-3 < loss[1]


def test_views_chunked_equals_unchunked_in_value_and_gradient(scorer, renders):
    def views(x):                                              # 6 deterministic shifted views, view-major
        return torch.cat([torch.roll(x, k, dims=-1) for k in range(6)])
    # per-sample targets: sample i has its own text; tiled over the views of each chunk
    base = ob.ClipTarget(scorer, scorer.text_embeddings(["a red circle", "a blue square"])[:, None, :])
    grads, vals = [], []
    for chunk in (1, 4, 100):
        x = renders.clone().requires_grad_(True)
        v = ob.Views(base, views, chunk=chunk)(x)
        v.sum().backward()
        vals.append(v.detach())
        grads.append(x.grad)
    for v, g in zip(vals[1:], grads[1:]):
        assert torch.allclose(v, vals[0], atol=1e-6) and torch.allclose(g, grads[0], atol=1e-6)
    # the mean over views of each sample's own target, computed view by view
    x = renders.detach()
    want = torch.stack([base(torch.roll(x, k, dims=-1)) for k in range(6)]).mean(0)
    assert torch.allclose(vals[0], want, atol=1e-6)


def test_regularisers():
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert ob.tv(flat).item() == 0 and ob.range_excess(flat).item() == 0 and ob.saturation(flat).item() == 0
    hot = torch.full((1, 3, 8, 8), 1.5)
    assert ob.range_excess(hot).item() == pytest.approx(0.25) and ob.saturation(hot).item() == pytest.approx(0.5)
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., ::2] = 1
    assert ob.tv(stripes).item() == pytest.approx(1.0)


def _laion_mlp(d):
    """The improved-aesthetic-predictor MLP as published (Linear/Dropout stack, no activations)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                               torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


@pytest.mark.parametrize("layout", ["linear", "mlp"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_heads_in_the_laion_layouts(tmp_path, scorer, renders, layout, fmt):
    d = scorer.encode_images(renders).shape[1]
    if layout == "linear":
        ref = torch.nn.Linear(d, 1)
        state = ref.state_dict()
    else:
        ref = _laion_mlp(d)
        state = {f"layers.{k}": v for k, v in ref.state_dict().items()}
    path = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    head = ob.load_aesthetic_head(path)
    assert head.kind == layout
    assert ob.load_aesthetic(f"aesthetic:{path}").state_dict().keys() == head.state_dict().keys()
    obj = ob.AestheticScore(scorer, head)
    emb = scorer.encode_images(renders)                         # unit norm, as LAION feeds the head
    with torch.no_grad():
        want = ref(emb).squeeze(-1)
    assert torch.allclose(obj.score(renders), want, atol=1e-4)
    assert torch.allclose(ob.evaluate(obj, renders), -want, atol=1e-4)


def test_aesthetic_head_errors(tmp_path, scorer, renders):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError) as e:
        ob.load_aesthetic_head(tmp_path / "evil.pth")
    assert "\n" not in str(e.value) and "evil.pth" in str(e.value)
    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "odd.pth")
    with pytest.raises(ModelLoadError, match="not a LAION aesthetic head"):
        ob.load_aesthetic_head(tmp_path / "odd.pth")
    with pytest.raises(ModelLoadError, match="no such file"):
        ob.load_aesthetic_head(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, tmp_path / "w7.pth")
    with pytest.raises(InputError, match="7-d"):
        ob.AestheticScore(scorer, ob.load_aesthetic_head(tmp_path / "w7.pth")).score(renders)


def test_aesthetic_specs_go_through_the_registry(tmp_path):
    from clipkit.core.registry import parse_spec
    with pytest.raises(ModelLoadError, match="no such file"):
        parse_spec(f"aesthetic:{tmp_path / 'missing.pth'}", "scorer")
    fifo = tmp_path / "head.pth"
    os.mkfifo(fifo)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        ob.load_aesthetic(f"aesthetic:{fifo}")                 # refused before anything opens it
    good = tmp_path / "lin.pth"
    torch.save({"weight": torch.zeros(1, 4), "bias": torch.zeros(1)}, good)
    assert parse_spec(f"aesthetic:{good}", "scorer").kind == "aesthetic"
    with pytest.raises(ModelLoadError, match="not a CLIP model spec"):
        parse_spec(f"aesthetic:{good}", "clip")
    with pytest.raises(ModelLoadError, match="is not a scorer model spec"):
        parse_spec("openclip:ViT-B-32/openai", "scorer")


def test_image_prompts_match_the_noise_level(scorer, renders):
    """ClipTarget.at(abar): image-prompt rows become the embedding of the image noised to abar (fixed
    draws, so deterministic); text rows and weights stay; abar = 1 is the target itself."""
    texts = scorer.text_embeddings(["a red circle"])
    target = ob.ClipTarget(scorer, torch.cat([texts, scorer.embed_pixels(renders[:1]).detach()]),
                           torch.tensor([0.5, 0.5]), image_pixels=renders[:1])
    assert target.at(1.0) is target
    half = target.at(0.3)
    assert half is target.at(0.3)                                    # cached per noise level
    assert torch.allclose(half.targets[0], target.targets[0])        # text unchanged
    assert not torch.allclose(half.targets[1], target.targets[1], atol=1e-3)
    again = ob.ClipTarget(scorer, target.targets, target.weights, image_pixels=renders[:1]).at(0.3)
    assert torch.equal(again.targets[1], half.targets[1])            # fixed noise draws
    assert torch.allclose(again.targets, half.targets, atol=1e-6)    # (text rows: normalised twice)
    # by hand: the mean embedding of 4 noised copies
    eps = torch.randn((4, *renders[:1].shape), generator=torch.Generator().manual_seed(0))
    xt = 0.3 ** 0.5 * (renders[:1] * 2 - 1) + 0.7 ** 0.5 * eps
    want = torch.nn.functional.normalize(scorer.embed_pixels(((xt + 1) / 2).flatten(0, 1)).mean(0), dim=-1)
    assert torch.allclose(half.targets[1], want.detach(), atol=1e-5)
    # a negative image prompt is matched the same way; a negative text is not touched
    neg = ob.ClipTarget(scorer, texts, negatives=torch.cat([texts, scorer.embed_pixels(renders[:1]).detach()]),
                        negative_pixels=renders[:1]).at(0.3)
    assert torch.allclose(neg.negatives[1], want.detach(), atol=1e-5)
    assert torch.allclose(neg.negatives[0], torch.nn.functional.normalize(texts[0], dim=-1), atol=1e-6)
    w = ob.Weighted([(1.0, target), (0.5, ob.tv)]).at(0.3)
    assert w.terms[0][1] is half and w.terms[1][1] is ob.tv


def test_a_colon_after_a_digit_is_text_not_a_weight():
    assert ob.parse_weighted_prompt("a clock showing 10:30") == [ob.PromptPart("a clock showing 10:30", 1.0)]
    assert ob.parse_weighted_prompt("a 16:9 frame | a cat:2") == [ob.PromptPart("a 16:9 frame"), ob.PromptPart("a cat", 2.0)]


def test_negatives_take_a_strength_and_a_prompt_slot():
    """--negative TEXT[:STRENGTH]: weight -STRENGTH; {prompt} stands for each positive text part
    (a templated negative is dropped when the prompt has no text: an image-prompt-only run)."""
    P = ob.PromptPart
    assert ob.parse_negative("a red shape") == P("a red shape", -1.0)
    assert ob.parse_negative(" a red shape:2.5 ") == P("a red shape", -2.5)
    assert ob.parse_negative("a clock at 10:30") == P("a clock at 10:30", -1.0)
    for bad in ("", "   ", "a red shape:0", "a red shape:-1", ":2"):
        with pytest.raises(InputError):
            ob.parse_negative(bad)
    one = ob.parse_weighted_prompt("a red circle:2")
    assert ob.negative_parts(["{prompt} and another shape:4", "two shapes"], one) == [
        P("a red circle and another shape", -4.0, templated=True), P("two shapes", -1.0)]
    # several parts (a part alone is not what the image should show) or none: templates are left out
    parts = ob.parse_weighted_prompt("a red circle | a square:2 | a blue shape:-1")
    assert ob.negative_parts(["{prompt} and another shape:4", "two shapes"], parts) == [P("two shapes", -1.0)]
    assert ob.negative_parts(["{prompt} and another shape"], []) == []


def test_erased_blanks_the_boxes_and_keeps_the_rest(scorer, renders):
    """Erased: the objective sees the pixels with every pixel a box touches (+ margin) set to the fill; the
    gradient reaches only the pixels kept; at(abar) fills with the background noised to abar (fixed draw)."""
    seen = []

    def probe(pixels):
        seen.append(pixels)
        return pixels.sum(dim=(1, 2, 3))
    e = ob.Erased(probe, [(0, 0, 1 / 3, 1 / 3)])
    x = renders.clone().requires_grad_(True)
    e(x).sum().backward()
    out = seen[-1]
    assert (out[..., :11, :11] == 0).all()                         # 32 px: the cell is 0..10.67
    assert torch.equal(out[..., 11:, :], renders[..., 11:, :]) and torch.equal(out[..., :, 11:], renders[..., :, 11:])
    assert renders[0, :, :11, :11].sum() > 0                       # the red circle at the top left was there
    assert (x.grad[..., :11, :11] == 0).all() and (x.grad[..., 11:, 11:] == 1).all()
    assert ob.Erased(probe, [(0, 0, 1 / 3, 1 / 3)], margin=2).rects(32, 32) == [(0, 13, 0, 13)]
    noisy = e.at(0.25)
    assert noisy.abar == 0.25 and e.at(1.0).abar is None and e.at(0.25) is noisy
    noisy(renders)
    bg = seen[-1][..., :11, :11]
    z = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))[..., :11, :11]
    assert torch.allclose(bg, (0.5 * -1 + 0.75 ** 0.5 * z + 1) / 2)    # black, noised as x_t
    noisy(renders)
    assert torch.equal(seen[-1], seen[-2])                         # a fixed draw


def test_erased_erases_before_the_views(renders):
    """Under views the pixels are erased first and the views made of the result, so a view's shift moves
    the image and its erased cell together; a Weighted sum holding an Erased term is viewed term by term,
    one without keeps one Views of the whole sum (every term the same views)."""
    seen = []

    def probe(pixels):
        seen.append(pixels)
        return pixels.sum(dim=(1, 2, 3))
    shift = lambda p: torch.cat([p, p.roll(3, dims=-1)])      # noqa: E731  two views: as is, shifted right
    e = ob.Erased(probe, [(0, 0, 1 / 3, 1 / 3)])
    ob.viewed(e, shift)(renders)
    erased = e.erase(renders)
    assert torch.equal(seen[-1], torch.cat([erased, erased.roll(3, dims=-1)]))
    w = ob.viewed(ob.Weighted([(1.0, e), (0.5, ob.tv)]), shift)
    assert isinstance(w, ob.Weighted) and isinstance(w.terms[0][1], ob.Erased) and isinstance(w.terms[1][1], ob.Views)
    assert isinstance(ob.viewed(ob.Weighted([(1.0, ob.tv)]), shift), ob.Views)
    nested = ob.Weighted([(1.0, ob.Weighted([(1.0, ob.tv)])), (0.5, ob.tv)])    # no Erased anywhere: one Views
    assert isinstance(ob.viewed(nested, shift), ob.Views)
    deep = ob.viewed(ob.Weighted([(1.0, ob.Weighted([(1.0, e)])), (0.5, ob.tv)]), shift)
    assert isinstance(deep.terms[0][1].terms[0][1], ob.Erased) and isinstance(deep.terms[1][1], ob.Views)
    assert isinstance(ob.viewed(ob.tv, shift), ob.Views)


def test_erased_scores_files_as_it_guides(scorer, renders):
    """score_images erases the boxes in the images as read, then scores with the inner objective: the red
    circle's score drops when its cell is erased, and equals the inner score of the erased render."""
    from clipkit.guidance.backends import tensor_to_pil
    target = ob.clip_text(scorer, ["a red circle at the top left"])
    images = [tensor_to_pil(r) for r in renders]
    whole = target.score_images(images)
    erased = ob.Erased(target, [(0, 0, 1 / 3, 1 / 3)])
    got = erased.score_images(images)
    assert got[0] < whole[0] - 0.05
    assert torch.allclose(got[1], whole[1], atol=1e-6)              # nothing of the blue square was erased
    by_hand = renders[:1].clone()
    by_hand[..., :11, :11] = 0
    assert torch.allclose(got[0], target.score_images([tensor_to_pil(by_hand[0])])[0], atol=1e-6)
    w = ob.Weighted([(1.0, erased)])
    assert torch.allclose(w.score_images(images), got) and isinstance(w.at(0.3).terms[0][1], ob.Erased)
