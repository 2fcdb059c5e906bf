import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.core.preprocess import pil_to_tensor


def _images():
    g = torch.Generator().manual_seed(0)
    arrs = (torch.rand(5, 40, 52, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrs]


TEXTS = ["a red circle", "a photo of a dog", "something at the top left"]


def _backend_reference(scorer, images, texts):
    """The backend's own computation, written against open_clip / transformers directly."""
    be = scorer.backend
    px = torch.stack([pil_to_tensor(im, scorer.preprocess) for im in images])
    with torch.no_grad():
        if hasattr(be.module, "encode_image"):                           # open_clip
            img = be.module.encode_image(px, normalize=True)
            txt = be.module.encode_text(be.tokenizer(texts), normalize=True)
            logits = be.module.logit_scale.exp() * img @ txt.T
        else:                                                            # transformers CLIPModel
            tok = be.tokenizer(texts, padding="max_length", max_length=be.context_length, return_tensors="pt")
            out = be.module(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
            logits = out.logits_per_image
            img, txt = out.image_embeds, out.text_embeds
    return img, txt, logits


def test_similarity_matches_backend(tiny_scorer):
    ims = _images()
    img, txt, logits = _backend_reference(tiny_scorer, ims, TEXTS)
    scores = tiny_scorer.score(ims, TEXTS)
    assert torch.allclose(scores.similarity, img @ txt.T, atol=1e-5)
    assert torch.allclose(scores.logits, logits, atol=1e-4)
    assert torch.allclose(tiny_scorer.encode_images(ims), F.normalize(img, dim=-1), atol=1e-5)


def test_normalisation_and_extras(tiny_scorer):
    ims = _images()
    e = tiny_scorer.encode_images(ims)
    t = tiny_scorer.encode_texts(TEXTS)
    assert e.dtype == torch.float32 and e.shape[0] == 5
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    s = tiny_scorer.score(ims, TEXTS)
    assert torch.allclose(s.logits, s.similarity * tiny_scorer.logit_scale)
    assert torch.allclose(s.probs.sum(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(s.clip_s, 2.5 * s.similarity.clamp(min=0))


def test_batch_size_does_not_change_results(tiny_scorer):
    ims = _images()
    ref = tiny_scorer.encode_images(ims, batch_size=5)
    for bs in (1, 2, 3):
        assert torch.allclose(tiny_scorer.encode_images(ims, batch_size=bs), ref, atol=1e-5)
    tref = tiny_scorer.encode_texts(TEXTS, batch_size=3)
    assert torch.allclose(tiny_scorer.encode_texts(TEXTS, batch_size=1), tref, atol=1e-5)


def test_inputs_paths_pil_and_tensor_agree(tiny_scorer, tmp_path):
    ims = _images()[:2]
    paths = []
    for i, im in enumerate(ims):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    a = tiny_scorer.encode_images(ims)
    b = tiny_scorer.encode_images(paths)
    assert torch.allclose(a, b, atol=1e-6)


def test_text_errors_and_truncation_warning(tiny_scorer, caplog):
    with pytest.raises(InputError, match="no texts"):
        tiny_scorer.encode_texts([])
    with pytest.raises(InputError, match="empty"):
        tiny_scorer.encode_texts(["ok", "   "])
    long = " ".join(["word"] * 200)
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        e = tiny_scorer.encode_texts([long])
    assert e.shape[0] == 1
    assert any("truncated" in r.message for r in caplog.records)


def test_embed_pixels_is_differentiable_and_gradcheck(tiny_openclip_dir):
    from clipkit.core.scorer import load_scorer
    sc = load_scorer(str(tiny_openclip_dir), device="cpu", precision="fp64")
    x = torch.rand(2, 3, 20, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = sc.encode_texts(["a red circle", "a blue square"])

    lg = sc.loss_and_grad(x, target)
    assert lg.grad.shape == x.shape and lg.loss.shape == (2,)
    # finite differences along a random direction (float64)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = 1e-5
    lp = sc.loss_and_grad(x + h * v, target).loss.sum()
    lm = sc.loss_and_grad(x - h * v, target).loss.sum()
    fd = (lp - lm) / (2 * h)
    assert torch.allclose(fd, (lg.grad * v).sum(), rtol=1e-4, atol=1e-8)
    assert sc.embed_pixels(x).shape == (2, 32)


def test_loss_and_grad_decreases_loss(shapes_scorer):
    from clipkit.shapes.render import render_scenes
    from clipkit.shapes.world import sample_scene
    x = render_scenes([sample_scene(3)], 32)
    x = (x * 0.5 + 0.25).clamp(0, 1)
    text = ["a large green square in the center"]
    lg = shapes_scorer.loss_and_grad(x, text, loss="spherical")
    step = x - 0.5 * lg.grad / lg.grad.abs().max()
    lg2 = shapes_scorer.loss_and_grad(step, text)
    assert lg2.loss.item() < lg.loss.item()
    sg = shapes_scorer.similarity_grad(x, text)
    assert torch.allclose(sg.loss, lg.similarity.mean(dim=1), atol=1e-5)


def test_bad_options():
    from clipkit.core.scorer import resolve_device, resolve_dtype
    with pytest.raises(InputError):
        resolve_dtype("fp8")
    with pytest.raises(InputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")
