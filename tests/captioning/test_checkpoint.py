"""Our checkpoint format and the official ClipCap .pt importer (state dicts built with the official
key layout and shapes, never downloaded)."""
import pickle

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipkit.captioning.checkpoint import (config_from_official, import_official, load_captioner_dir,
                                           save_captioner)
from clipkit.captioning.tokenizer import train_bpe_tokenizer
from clipkit.core.errors import ModelLoadError

CLIP_DIM, WIDTH, K = 24, 32, 5


def official_gpt_keys(seed=0):
    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=70, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=48))
    sd = {f"gpt.{k}": v.clone() for k, v in gpt.state_dict().items()}
    # old transformers saved these buffers; newer ones complain about them
    for i in range(2):
        sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def official_mlp_state_dict(hidden=40):
    g = torch.Generator().manual_seed(1)
    sd = official_gpt_keys()
    sd.update({"clip_project.model.0.weight": torch.randn(hidden, CLIP_DIM, generator=g),
               "clip_project.model.0.bias": torch.randn(hidden, generator=g),
               "clip_project.model.2.weight": torch.randn(WIDTH * K, hidden, generator=g),
               "clip_project.model.2.bias": torch.randn(WIDTH * K, generator=g)})
    return sd


def official_transformer_state_dict(clip_length=3, layers=2):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    sd = official_gpt_keys()
    sd["clip_project.linear.weight"] = r(clip_length * WIDTH, CLIP_DIM)
    sd["clip_project.linear.bias"] = r(clip_length * WIDTH)
    sd["clip_project.prefix_const"] = r(K, WIDTH)
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        sd.update({p + "norm1.weight": 1 + r(WIDTH), p + "norm1.bias": r(WIDTH),
                   p + "attn.to_queries.weight": r(WIDTH, WIDTH),
                   p + "attn.to_keys_values.weight": r(2 * WIDTH, WIDTH),
                   p + "attn.project.weight": r(WIDTH, WIDTH), p + "attn.project.bias": r(WIDTH),
                   p + "norm2.weight": 1 + r(WIDTH), p + "norm2.bias": r(WIDTH),
                   p + "mlp.fc1.weight": r(2 * WIDTH, WIDTH), p + "mlp.fc1.bias": r(2 * WIDTH),
                   p + "mlp.fc2.weight": r(WIDTH, 2 * WIDTH), p + "mlp.fc2.bias": r(WIDTH)})
    return sd


def test_import_official_mlp(tmp_path):
    sd = official_mlp_state_dict()
    torch.save(sd, tmp_path / "coco_weights.pt")
    model, tok = import_official(tmp_path / "coco_weights.pt")
    cfg = model.cfg
    assert (cfg.mapper, cfg.clip_dim, cfg.prefix_length, cfg.mlp_hidden) == ("mlp", CLIP_DIM, K, 40)
    assert cfg.normalize_prefix is False and cfg.stop_token == "."
    assert model.gpt.config.n_layer == 2 and model.gpt.config.vocab_size == 70
    x = torch.randn(3, CLIP_DIM)
    want = (torch.tanh(x @ sd["clip_project.model.0.weight"].T + sd["clip_project.model.0.bias"])
            @ sd["clip_project.model.2.weight"].T + sd["clip_project.model.2.bias"]).view(3, K, WIDTH)
    assert torch.allclose(model.prefix(x), want, atol=1e-5)
    assert torch.equal(model.gpt.transformer.wte.weight, sd["gpt.transformer.wte.weight"])
    assert torch.equal(model.gpt.lm_head.weight, sd["gpt.transformer.wte.weight"])   # tied


def test_import_official_transformer(tmp_path):
    """Layout and config only; the mapper math and decoding against a re-statement of the official
    code are in tests/conformance/test_clipcap.py."""
    sd = official_transformer_state_dict()
    torch.save(sd, tmp_path / "transformer_weights.pt")
    model, _ = import_official(tmp_path / "transformer_weights.pt")
    cfg = model.cfg
    assert (cfg.mapper, cfg.prefix_length, cfg.clip_length, cfg.mapper_layers) == ("transformer", K, 3, 2)
    assert cfg.normalize_prefix is True          # as transformer_weights.pt's notebook
    assert (cfg.stop_token, cfg.stop_at_eos, cfg.max_tokens) == (".", False, 67)
    assert not any(p.requires_grad for p in model.gpt.parameters())
    x = torch.randn(2, CLIP_DIM)
    assert torch.allclose(model.prefix(x), model.prefix(5 * x), atol=1e-5)


def test_clip_spec_follows_the_mapper_width_and_can_be_overridden(tmp_path):
    from clipkit.captioning.captioner import load_captioner
    cfg = config_from_official(official_transformer_state_dict())
    assert cfg.clip_spec is None                 # 24-d: no official CLIP has that width
    sd = official_mlp_state_dict()
    sd["clip_project.model.0.weight"] = torch.randn(40, 640)
    assert config_from_official(sd).clip_spec == "openclip:RN50x4/openai"
    sd["clip_project.model.0.weight"] = torch.randn(40, 512)
    assert config_from_official(sd).clip_spec == "openclip:ViT-B-32-quickgelu/openai"
    over = config_from_official(official_transformer_state_dict(), clip_spec="/my/clip", normalize_prefix=False)
    assert (over.clip_spec, over.normalize_prefix) == ("/my/clip", False)
    # a captioner whose CLIP is unknown needs --clip: one-line error, nothing downloaded
    torch.save(official_mlp_state_dict(), tmp_path / "odd.pt")
    tok = train_bpe_tokenizer(["a red circle"] * 5, vocab_size=270)
    tok.save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ModelLoadError, match="pass --clip with a 24-d CLIP") as e:
        load_captioner(str(tmp_path / "odd.pt"), tokenizer=str(tmp_path / "tok"), device="cpu")
    assert "\n" not in str(e.value)


def test_config_is_read_from_shapes():
    cfg = config_from_official(official_mlp_state_dict(hidden=50))
    assert cfg.mlp_hidden == 50 and cfg.decoder["n_embd"] == WIDTH and cfg.decoder["n_positions"] == 48


class _Evil:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(_Evil.target),))


def test_pickled_code_is_refused_and_never_executed(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    sd = official_mlp_state_dict()
    sd["payload"] = _Evil()
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(sd, f)                 # what torch.save would write, with an object inside
    torch.save({**official_mlp_state_dict(), "extra": _Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(ModelLoadError) as e:
            import_official(tmp_path / name)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_wrong_shapes_and_foreign_files_are_clear_errors(tmp_path):
    bad = official_mlp_state_dict()
    bad["clip_project.model.2.weight"] = torch.randn(WIDTH * K + 3, 40)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="multiple"):
        import_official(tmp_path / "bad.pt")
    wrong = official_mlp_state_dict()
    wrong["clip_project.model.2.bias"] = torch.randn(7)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ModelLoadError, match="size mismatch|shape"):
        import_official(tmp_path / "wrong.pt")
    torch.save({"conv.weight": torch.randn(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a ClipCap checkpoint"):
        import_official(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ModelLoadError):
        import_official(tmp_path / "text.pt")


def test_our_format_round_trips(tmp_path):
    from clipkit.captioning.decode import DecodeConfig, decode
    from clipkit.captioning.model import CaptionerConfig, ClipCapModel
    tok = train_bpe_tokenizer(["a red circle", "a blue square at the top"] * 20, vocab_size=280)
    torch.manual_seed(0)
    cfg = CaptionerConfig(clip_dim=16, prefix_length=3, decoder=dict(vocab_size=len(tok), n_embd=32, n_layer=1,
                                                                     n_head=2, n_positions=32))
    model = ClipCapModel(cfg).eval()
    save_captioner(tmp_path / "cap", model, tok)
    model2, tok2 = load_captioner_dir(tmp_path / "cap")
    e = torch.randn(2, 16)
    d = DecodeConfig(strategy="greedy", max_length=8)
    a = decode(model.gpt, model.prefix(e), tok.eos_token_id, d)
    b = decode(model2.gpt, model2.prefix(e), tok2.eos_token_id, d)
    assert [r[0].tokens for r in a] == [r[0].tokens for r in b]
    assert tok2.decode(tok2("a red circle")["input_ids"]) == "a red circle"
    (tmp_path / "cap" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError):
        load_captioner_dir(tmp_path / "cap")
