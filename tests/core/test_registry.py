import time

import pytest

from clipkit.core.errors import ModelLoadError
from clipkit.core.registry import is_available, list_models, load_clip, parse_spec


@pytest.mark.parametrize("spec,needle", [
    ("", "empty model spec"),
    ("openclip:ViT-B-32", "expected openclip:ARCH/TAG"),
    ("hf:justonename", "expected hf:ORG/NAME"),
    ("whatever", "unknown model spec"),
    ("./no/such/dir", "no such directory"),
])
def test_parse_errors_are_one_line(spec, needle):
    with pytest.raises(ModelLoadError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and repr(spec) in msg


def test_unknown_arch_and_tag_name_the_fix():
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        load_clip("openclip:ViT-Nope/openai")
    with pytest.raises(ModelLoadError, match="choose one of: .*laion2b_s34b_b79k"):
        load_clip("openclip:ViT-B-32/nope")


def test_hub_offline_and_not_cached_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for spec in ("hf:someorg/some-clip", "openclip:ViT-B-32/laion2b_s34b_b79k"):
        t = time.time()
        with pytest.raises(ModelLoadError) as e:
            load_clip(spec)
        assert time.time() - t < 30
        assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)


def test_local_dirs(tiny_openclip_dir, tiny_hf_dir, tmp_path):
    assert parse_spec(str(tiny_openclip_dir)).kind == "local-openclip"
    assert parse_spec(str(tiny_hf_dir)).kind == "local-hf"
    assert load_clip(str(tiny_openclip_dir)).context_length == 77
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "open_clip_config.json").write_text(
        (tiny_openclip_dir / "open_clip_config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights file"):
        load_clip(str(tmp_path / "noweights"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_clip(str(tmp_path / "empty"))


def test_bundled_and_listing():
    be = load_clip("shapes")
    assert be.spec == "shapes" and be.preprocess.image_size == 48
    rows = {(e.profile, e.component): e for e in list_models()}
    assert rows[("shapes", "clip")].available
    assert rows[("shapes", "diffusion")].available
    assert is_available("hf:org/name")[0] in (True, False)


def test_bundled_noised_guide_is_an_overlay_of_the_bundled_clip():
    """`shapes-noised` shares the bundled CLIP's text tower exactly and is marked noise-aware."""
    import torch

    from clipkit.core.registry import is_noise_aware
    from clipkit.core.scorer import load_scorer
    base, noised = load_scorer("shapes", device="cpu"), load_scorer("shapes-noised", device="cpu")
    assert noised.spec == "shapes-noised" and is_noise_aware("shapes-noised") and not is_noise_aware("shapes")
    assert not is_noise_aware("hf:org/name") and not is_noise_aware("nonsense spec")
    texts = ["a red circle at the top left", "a small blue square"]
    assert torch.equal(base.encode_texts(texts), noised.encode_texts(texts))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(base.encode_images(x), noised.encode_images(x), atol=1e-3)
    rows = {(e.profile, e.component): e for e in list_models()}
    assert rows[("shapes", "guide")].spec == "shapes-noised" and rows[("shapes", "guide")].available
