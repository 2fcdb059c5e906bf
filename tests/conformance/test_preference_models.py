"""CLIP-architecture preference models load through the existing specs and score as their own code does.

* HPSv2 ships a bare open_clip checkpoint (``HPS_v2_compressed.pt``: ``{"state_dict": ...}`` for
  ViT-H-14); its inference code builds the architecture with open_clip and loads that state dict. Here:
  a tiny architecture registered with open_clip, saved in that exact format, loaded as
  ``openclip:ARCH/PATH.pt``; the reference is open_clip's own model, preprocessing and tokenizer.
* PickScore is a transformers ``CLIPModel`` directory: that path is the transformers-directory
  conformance tests of tests/conformance/test_scoring.py; nothing PickScore-specific.
"""
from __future__ import annotations

import json

import torch
from PIL import Image

from helpers import TINY_OPENCLIP_CFG     # tests/ is on sys.path (conftest.py)


def test_hpsv2_format_openclip_state_dict(tmp_path):
    import open_clip

    from clipkit.core.scorer import load_scorer
    (tmp_path / "tiny-hps-test.json").write_text(json.dumps(TINY_OPENCLIP_CFG))
    open_clip.add_model_config(tmp_path / "tiny-hps-test.json")
    torch.manual_seed(0)
    ref = open_clip.create_model("tiny-hps-test").eval()
    # HPSv2's format: the weights under "state_dict", saved from a DDP model ("module." prefixes)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "hps.pt")
    scorer = load_scorer(f"openclip:tiny-hps-test/{tmp_path / 'hps.pt'}", device="cpu")
    g = torch.Generator().manual_seed(1)
    ims = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    _, _, pre = open_clip.create_model_and_transforms("tiny-hps-test")
    tok = open_clip.get_tokenizer("tiny-hps-test")
    with torch.no_grad():
        want_i = torch.nn.functional.normalize(ref.encode_image(torch.stack([pre(im) for im in ims])), dim=-1)
        want_t = torch.nn.functional.normalize(ref.encode_text(tok(["a dog", "a cat"])), dim=-1)
    assert torch.allclose(scorer.encode_images(ims).float(), want_i, atol=1e-5)
    assert torch.allclose(scorer.text_embeddings(["a dog", "a cat"]).float(), want_t, atol=1e-5)
    # HPSv2's score is the cosine (x 100 in its code): the same ranking as clipkit's cosine
    assert torch.allclose(scorer.similarity(ims, ["a dog", "a cat"]).float(), want_i @ want_t.T, atol=1e-5)
