import time

import pytest

from clipkit.core.errors import ModelLoadError
from clipkit.core.profiles import is_available, list_models
from clipkit.core.registry import load_clip, parse_spec


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


# --------------------------------------------------------------------------------------------
# One registry, every kind: spec sources behind one protocol
# --------------------------------------------------------------------------------------------

def _clipcap_dir(tmp_path):
    from clipkit.core.registry import CLIPCAP_CONFIG
    d = tmp_path / "cap"
    d.mkdir()
    (d / CLIPCAP_CONFIG).write_text("{}")
    return d


def test_clipcap_marker_is_the_captioning_plugins_config_name():
    from clipkit.captioning.checkpoint import CONFIG_NAME
    from clipkit.core.registry import CLIPCAP_CONFIG
    assert CLIPCAP_CONFIG == CONFIG_NAME


def test_each_source_parses_its_specs(tiny_openclip_dir, tiny_hf_dir, tmp_path):
    from clipkit.core.registry import SOURCES, bundled_path
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    (tmp_path / "ckpt.pt").write_bytes(b"")
    cases = [("shapes", "clip", "bundled"), ("shapes-noised", "clip", "bundled"), ("shapes", "diffusion", "bundled"),
             ("shapes", "captioner", "bundled"), ("openclip:ViT-B-32/openai", "clip", "openclip"),
             ("hf:org/name", "clip", "hf"), ("hf:org/name", "diffusion", "hf"), ("hf:gpt2", "decoder", "hf"),
             ("gpt2", "decoder", "hf"), ("org/gpt", "decoder", "hf"),
             (str(tiny_openclip_dir), "clip", "local-openclip"),
             (str(bundled_path("shapes-noised", "clip")), "clip", "overlay"),
             (str(tiny_hf_dir), "clip", "local-hf"), (str(tiny_hf_dir), "decoder", "local-hf"),
             (str(tmp_path / "sd"), "diffusion", "local-diffusers"),
             (str(_clipcap_dir(tmp_path)), "captioner", "clipcap-dir"),
             (str(tmp_path / "ckpt.pt"), "captioner", "file"),
             (f"aesthetic:{tmp_path / 'ckpt.pt'}", "scorer", "aesthetic")]
    seen = set()
    for spec, component, kind in cases:
        s = parse_spec(spec, component)
        assert (s.kind, s.component, s.source.kind) == (kind, component, kind), spec
        assert component in s.source.components
        seen.add(type(s.source))
    assert seen == {type(src) for src in SOURCES}          # every source is exercised
    assert parse_spec("openclip:ViT-B-32/openai").extra == {"arch": "ViT-B-32", "tag": "openai"}
    assert parse_spec("  shapes ") == parse_spec("shapes")


@pytest.mark.parametrize("spec,component,needle", [
    ("whatever", "diffusion", "unknown model spec"),
    ("", "diffusion", "empty model spec"),
    ("hf:org/name", "captioner", "no such captioner directory or .pt file"),
    ("whatever", "captioner", "no such captioner directory or .pt file"),
    ("./nowhere", "captioner", "no such captioner directory or .pt file"),
    ("", "captioner", "empty captioner spec"),
    ("openclip:ViT-B-32/openai", "diffusion", "is not a diffusion model spec"),
    ("shapes", "decoder", "is not a GPT-2 model spec"),
    ("./no/such/dir", "decoder", "no such directory"),
])
def test_unknown_or_wrong_kind_specs_are_one_line_errors(spec, component, needle):
    with pytest.raises(ModelLoadError) as e:
        parse_spec(spec, component)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and repr(spec.strip()) in msg and e.value.fix


def test_a_source_refuses_the_kinds_it_cannot_give(tiny_openclip_dir, tiny_hf_dir, tmp_path):
    (tmp_path / "f.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="a single file is not a CLIP model spec"):
        load_clip(str(tmp_path / "f.pt"))
    with pytest.raises(ModelLoadError, match="directory has no model_index.json"):
        parse_spec(str(tiny_hf_dir), "diffusion")
    with pytest.raises(ModelLoadError, match="an open_clip directory is not a diffusion model spec"):
        parse_spec(str(tiny_openclip_dir), "diffusion")
    with pytest.raises(ModelLoadError, match="a captioner directory is not a CLIP model spec"):
        parse_spec(str(_clipcap_dir(tmp_path)))
    with pytest.raises(ValueError, match="unknown model kind"):
        parse_spec("shapes", "vae")
    assert is_available(str(tmp_path / "f.pt")) == (False, "a single file is not a CLIP model spec")
    assert is_available(str(tmp_path / "f.pt"), "captioner") == (True, "local")


def test_every_kind_resolves_through_the_registry(tiny_hf_dir, tmp_path, monkeypatch):
    from clipkit.core.registry import bundled_path, resolve
    for component in ("clip", "diffusion", "captioner"):
        r = resolve("shapes", component)
        assert (r.location, r.local_only, r.on_disk, r.bundled) == (str(bundled_path("shapes", component)),
                                                                    True, True, True)
        assert r.fix("check the directory") == "check the directory"
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    r = resolve(str(tmp_path / "sd"), "diffusion")
    assert (r.kind, r.location, r.local_only, r.bundled) == ("local-diffusers", str(tmp_path / "sd"), True, False)
    assert r.file("model_index.json") == tmp_path / "sd" / "model_index.json"
    assert resolve(str(tiny_hf_dir), "decoder").location == str(tiny_hf_dir)
    assert resolve(str(_clipcap_dir(tmp_path)), "captioner").location == str(tmp_path / "cap")
    # a missing bundled model names the kind's fix
    monkeypatch.setattr("clipkit.core.registry.assets_dir", lambda: tmp_path / "no-assets")
    for component, needle in [("clip", "train clip"), ("diffusion", "train diffusion"),
                              ("captioner", "train captioner")]:
        with pytest.raises(ModelLoadError, match=needle) as e:
            resolve("shapes", component)
        assert "missing from" in str(e.value) and "\n" not in str(e.value)


def test_hub_specs_resolve_only_when_cached_or_online(monkeypatch, tmp_path):
    from clipkit.core.registry import resolve
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for spec, component in [("hf:org/some-sd", "diffusion"), ("hf:org/some-clip", "clip"),
                            ("someorg/some-gpt", "decoder"), ("openclip:ViT-B-32/laion2b_s34b_b79k", "clip")]:
        t = time.time()
        with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as e:
            resolve(spec, component)
        assert time.time() - t < 30 and repr(spec) in str(e.value)
    # cached: resolves to the repo id, offline
    monkeypatch.setattr("clipkit.core.hub.hub_cached", lambda repo, files: True)
    r = resolve("hf:org/some-sd", "diffusion")
    assert (r.location, r.local_only, r.on_disk, r.bundled) == ("org/some-sd", True, False, False)
    from clipkit.core.hub import OFFLINE_FIX
    assert r.fix("check the directory") == OFFLINE_FIX


def test_training_info_and_model_cfg_come_from_the_source(tiny_openclip_dir, tiny_hf_dir):
    from clipkit.core.registry import clip_training_info
    assert clip_training_info("shapes-noised")["noise_aware"] is True
    assert clip_training_info(str(tiny_hf_dir)) == {} and clip_training_info("hf:org/name") == {}
    shapes = parse_spec("shapes").model_cfg()
    assert shapes == parse_spec("shapes-noised").model_cfg() and shapes["embed_dim"] > 0
    assert parse_spec("openclip:ViT-B-32/openai").model_cfg()["embed_dim"] == 512
    assert parse_spec(str(tiny_openclip_dir)).model_cfg()["embed_dim"] > 0
    with pytest.raises(ModelLoadError, match="not an open_clip model"):
        parse_spec(str(tiny_hf_dir)).model_cfg()


def test_listing_covers_every_kind_from_the_profile_table():
    from clipkit.core.profiles import PROFILES, list_sources
    rows = list_models()
    assert {(e.profile, e.component) for e in rows} >= {(p, c) for p in PROFILES
                                                          for c in ("clip", "diffusion", "captioner")}
    assert {e.component for e in rows if e.profile == "shapes"} == {"clip", "guide", "diffusion", "captioner"}
    kinds = {s["kind"] for s in list_sources()}
    assert {"bundled", "openclip", "hf", "local-openclip", "overlay", "local-hf", "local-diffusers",
            "clipcap-dir", "file"} <= kinds


def test_a_directory_is_read_as_the_kind_asked_for(tmp_path):
    """A ClipCap directory that also holds a transformers config.json is a captioner when a captioner
    is asked for: the first source that gives the kind wins, not the first that recognises the path."""
    from clipkit.core.registry import CLIPCAP_CONFIG, parse_spec
    d = tmp_path / "cap"
    d.mkdir()
    (d / CLIPCAP_CONFIG).write_text("{}")
    (d / "config.json").write_text("{}")
    assert "captioner" in parse_spec(str(d), "captioner").source.components
    assert "clip" in parse_spec(str(d), "clip").source.components


def test_a_user_registers_a_spec_source_and_a_diffusion_loader(tmp_path, tiny_openclip_dir):
    """The registry is open: a new spec syntax from Python (here ``team:NAME`` -> a local open_clip
    folder), and a loader for a diffusers pipeline class of one's own."""
    import json

    from clipkit.core import registry
    from clipkit.core.errors import ModelLoadError
    from clipkit.core.registry import ModelSpec, Source, register_diffusion_loader, register_source

    class TeamSource(Source):
        kind, syntax, noun = "team", "team:NAME", "a team model"
        components = frozenset({"clip"})

        def parse(self, spec, component):
            return ModelSpec(spec, self, spec.split(":", 1)[1], component=component) if spec.startswith("team:") else None

        def load_clip(self, s):
            backend = parse_spec(str(tiny_openclip_dir)).load_clip()
            backend.spec = s.raw
            return backend

    before = list(registry.SOURCES)
    try:
        with pytest.raises(ModelLoadError):
            parse_spec("team:tiny")
        register_source(TeamSource())
        assert load_clip("team:tiny").spec == "team:tiny"
        with pytest.raises(TypeError):
            register_source("not a source")
    finally:
        registry.SOURCES[:] = before

    from clipkit.guidance.diffusion import load_diffusion
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MyPipeline"}))
    with pytest.raises(ModelLoadError, match="unsupported diffusion pipeline 'MyPipeline'.*StableDiffusionPipeline"):
        load_diffusion(str(tmp_path))
    seen = []
    register_diffusion_loader("MyPipeline", lambda *a, **k: seen.append(a) or "backend")
    try:
        assert load_diffusion(str(tmp_path)) == "backend" and seen[0][0] == str(tmp_path)
    finally:
        registry.DIFFUSION_LOADERS.pop("MyPipeline")
