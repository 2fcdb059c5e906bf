"""Conformance: official ClipCap checkpoints caption in clipkit exactly as in the official code.

The reference is a re-statement, written here, of the inference code of rmokady/CLIP_prefix_caption:
the model classes of ``train.py`` / ``notebooks/transformer_inference.ipynb`` (``MLP``,
``MlpTransformer``, ``MultiHeadAttention``, ``TransformerLayer``, ``Transformer``,
``TransformerMapper``, ``ClipCaptionModel``), the decoders ``generate2`` and ``generate_beam`` of
``predict.py`` / the notebooks, and each notebook's prefix step (raw CLIP features for the MLP
checkpoints; ``prefix / prefix.norm(2, -1).item()`` for the transformer one). It keeps their quirks:
no bias on the attention's query/key-value maps, scale ``head_dim ** -0.5`` with head_dim from the
*query* width, softmax over the key axis of a ``b n m h`` layout, 8 heads hard-coded, mlp_ratio 2 and
ReLU, ``enc_dec=False`` (every layer self-attention), dropout 0; ``generate2`` filters top-p 0.8 and
takes the argmax, GPT-2 re-reads the whole sequence each step, stops at the '.' token only (not at
EOS), 67 tokens at most; ``generate_beam`` (beam 5) freezes a stopped beam by giving token 0 log-prob
0, ranks by ``scores_sum / seq_lengths`` and carries ``average * length`` as the score.

The checkpoints are what the official training script writes: ``torch.save(model.state_dict())`` of
that model, with the ``attn.bias``/``attn.masked_bias`` buffers old transformers' GPT-2 carried, on a
tiny GPT-2 (``GPT2Config``) with GPT-2's tokenizer layout (byte tokens first, so '.' is id 13, and
``<|endoftext|>`` last). Nothing here asks clipkit for the expected tokens.
"""
import copy
import json
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as nnf
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from clipkit.captioning.captioner import Captioner
from clipkit.captioning.checkpoint import import_official
from clipkit.captioning.decode import DecodeConfig, decode
from clipkit.core.errors import InputError, ModelLoadError

WIDTH, N_LAYER, N_HEAD, N_POS = 128, 2, 2, 128      # GPT-2's 64-wide heads, room for 40 + 67 tokens
N_FEATURES = 3                                        # random CLIP features per mapper and decoder
EOS_TEXT = "<|endoftext|>"


# ==== the official code, re-stated (train.py / transformer_inference.ipynb / predict.py) ==========

class MLP(nn.Module):
    def forward(self, x):
        return self.model(x)

    def __init__(self, sizes, bias=True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim, out_d: Optional[int] = None, act=nnf.relu, dropout=0.):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=True, dropout=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim_self // num_heads
        self.scale = head_dim ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, y=None, mask=None):
        y = y if y is not None else x
        b, n, c = x.shape
        _, m, d = y.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)        # b n h dh
        keys_values = self.to_keys_values(y).reshape(b, m, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum('bnhd,bmhd->bnmh', queries, keys) * self.scale
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.unsqueeze(1)
            attention = attention.masked_fill(mask.unsqueeze(3), float("-inf"))
        attention = attention.softmax(dim=2)
        out = torch.einsum('bnmh,bmhd->bnhd', attention, values).reshape(b, n, c)
        return self.project(out), attention


class TransformerLayer(nn.Module):
    def forward(self, x, y=None, mask=None):
        x = x + self.attn(self.norm1(x), y, mask)[0]
        x = x + self.mlp(self.norm2(x))
        return x

    def __init__(self, dim_self, dim_ref, num_heads, mlp_ratio=4., bias=False, dropout=0., act=nnf.relu,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads, bias=bias, dropout=dropout)
        self.norm2 = norm_layer(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), act=act, dropout=dropout)


class Transformer(nn.Module):
    def forward(self, x, y=None, mask=None):
        for i, layer in enumerate(self.layers):
            if i % 2 == 0 and self.enc_dec:     # cross
                x = layer(x, y)
            elif self.enc_dec:                  # self
                x = layer(x, x, mask)
            else:                               # self or cross
                x = layer(x, y, mask)
        return x

    def __init__(self, dim_self, num_heads, num_layers, dim_ref=None, mlp_ratio=2., act=nnf.relu,
                 norm_layer=nn.LayerNorm, enc_dec=False):
        super().__init__()
        dim_ref = dim_ref if dim_ref is not None else dim_self
        self.enc_dec = enc_dec
        if enc_dec:
            num_layers = num_layers * 2
        layers = []
        for i in range(num_layers):
            if i % 2 == 0 and enc_dec:      # cross
                layers.append(TransformerLayer(dim_self, dim_ref, num_heads, mlp_ratio, act=act,
                                               norm_layer=norm_layer))
            elif enc_dec:                   # self
                layers.append(TransformerLayer(dim_self, dim_self, num_heads, mlp_ratio, act=act,
                                               norm_layer=norm_layer))
            else:                           # self or cross
                layers.append(TransformerLayer(dim_self, dim_ref, num_heads, mlp_ratio, act=act,
                                               norm_layer=norm_layer))
        self.layers = nn.ModuleList(layers)


class TransformerMapper(nn.Module):
    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        return self.transformer(prefix)[:, self.clip_length:]

    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)


class ClipCaptionModel(nn.Module):
    """train.py's model; ``GPT2LMHeadModel.from_pretrained('gpt2')`` becomes a tiny config."""

    def __init__(self, prefix_length, gpt_config, clip_length=None, prefix_size=512, num_layers=8,
                 mapping_type="mlp"):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = GPT2LMHeadModel(gpt_config)
        self.gpt_embedding_size = self.gpt.transformer.wte.weight.shape[1]
        if mapping_type == "mlp":
            self.clip_project = MLP((prefix_size, (self.gpt_embedding_size * prefix_length) // 2,
                                     self.gpt_embedding_size * prefix_length))
        else:
            self.clip_project = TransformerMapper(prefix_size, self.gpt_embedding_size, prefix_length,
                                                  clip_length, num_layers)


def generate_beam(model, tokenizer, beam_size=5, embed=None, entry_length=67, temperature=1.,
                  stop_token='.'):
    """The official beam search (the ``embed`` path); returns (texts, token lists), best first."""
    model.eval()
    stop_token_index = tokenizer.encode(stop_token)[0]
    tokens = None
    scores = None
    device = next(model.parameters()).device
    seq_lengths = torch.ones(beam_size, device=device)
    is_stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
    with torch.no_grad():
        generated = embed
        for i in range(entry_length):
            outputs = model.gpt(inputs_embeds=generated)
            logits = outputs.logits
            logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
            logits = logits.softmax(-1).log()
            if scores is None:
                scores, next_tokens = logits.topk(beam_size, -1)
                generated = generated.expand(beam_size, *generated.shape[1:])
                next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
                tokens = next_tokens
            else:
                logits[is_stopped] = -float("inf")
                logits[is_stopped, 0] = 0
                scores_sum = scores[:, None] + logits
                seq_lengths[~is_stopped] += 1
                scores_sum_average = scores_sum / seq_lengths[:, None]
                scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
                next_tokens_source = next_tokens // scores_sum.shape[1]
                seq_lengths = seq_lengths[next_tokens_source]
                next_tokens = next_tokens % scores_sum.shape[1]
                next_tokens = next_tokens.unsqueeze(1)
                tokens = tokens[next_tokens_source]
                tokens = torch.cat((tokens, next_tokens), dim=1)
                generated = generated[next_tokens_source]
                scores = scores_sum_average * seq_lengths
                is_stopped = is_stopped[next_tokens_source]
            next_token_embed = model.gpt.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
            generated = torch.cat((generated, next_token_embed), dim=1)
            is_stopped = is_stopped + next_tokens.eq(stop_token_index).squeeze()
            if is_stopped.all():
                break
    scores = scores / seq_lengths
    output_list = tokens.cpu().numpy()
    token_lists = [output[:int(length)].tolist() for output, length in zip(output_list, seq_lengths)]
    order = scores.argsort(descending=True)
    return ([tokenizer.decode(token_lists[i]) for i in order], [token_lists[i] for i in order])


def generate2(model, tokenizer, embed=None, entry_length=67, top_p=0.8, temperature=1., stop_token='.'):
    """The official greedy decoder (entry_count 1, the ``embed`` path); returns (text, tokens)."""
    model.eval()
    tokens = None
    stop_token_index = tokenizer.encode(stop_token)[0]
    filter_value = -float("Inf")
    with torch.no_grad():
        generated = embed
        for i in range(entry_length):
            outputs = model.gpt(inputs_embeds=generated)
            logits = outputs.logits
            logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
            sorted_logits, sorted_indices = torch.sort(logits, descending=True)
            cumulative_probs = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1)
            sorted_indices_to_remove = cumulative_probs > top_p
            sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
            sorted_indices_to_remove[..., 0] = 0
            indices_to_remove = sorted_indices[sorted_indices_to_remove]
            logits[:, indices_to_remove] = filter_value
            next_token = torch.argmax(logits, -1).unsqueeze(0)
            next_token_embed = model.gpt.transformer.wte(next_token)
            tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
            generated = torch.cat((generated, next_token_embed), dim=1)
            if stop_token_index == next_token.item():
                break
        output_list = tokens.squeeze(0).cpu().tolist()      # (official: list(tokens.squeeze()...))
    return tokenizer.decode(output_list), output_list


def official_prefix_embed(model, kind, clip_feature):
    """Each notebook's prefix step for ONE image: raw features (MLP notebook, predict.py) or
    ``prefix / prefix.norm(2, -1).item()`` (transformer notebook), then clip_project."""
    with torch.no_grad():
        prefix = clip_feature[None].to(dtype=torch.float32)
        if kind == "transformer":
            prefix = prefix / prefix.norm(2, -1).item()
        return model.clip_project(prefix).reshape(1, model.prefix_length, -1)


# ==== the released checkpoints' layouts, tiny ====================================================

#: coco_weights.pt / conceptual_weights.pt: MLP, ViT-B/32 (512-d), prefix 10;
#: transformer_weights.pt: transformer mapper, RN50x4 (640-d), prefix 40, clip length 40, 8 layers
RELEASED = {"mlp": dict(prefix_length=10, prefix_size=512),
            "transformer": dict(prefix_length=40, clip_length=40, prefix_size=640, num_layers=8)}


def gpt2_layout_tokenizer(path):
    """A byte-level BPE tokenizer laid out like GPT-2's: the 256 byte symbols in GPT-2's order (so '!'
    is 0 and '.' is 13), a few merges, ``<|endoftext|>`` last."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    merges = [("Ġ", "a"), ("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("o", "n"), ("Ġ", "s"), ("i", "n"), ("Ġ", "o")]
    vocab = {chr(c): i for i, c in enumerate(cs)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOS_TEXT] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = GPT2Tokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(str(path))
    return tok


def old_transformers_buffers(sd, n_layer, n_ctx, dtype):
    """The per-layer buffers GPT-2 in transformers < 4.31 registered, and so saved: ``attn.bias``
    (the causal mask, [1, 1, n_ctx, n_ctx], uint8 in old releases, bool later) and ``attn.masked_bias``."""
    for i in range(n_layer):
        mask = torch.tril(torch.ones(n_ctx, n_ctx, dtype=dtype)).view(1, 1, n_ctx, n_ctx)
        sd[f"gpt.transformer.h.{i}.attn.bias"] = mask
        sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


#: (seed, '.' embedding scale) per mapper, chosen so that captions end both at '.' (after 2 to 54
#: tokens) and at the 67-token limit, and stopped and running beams coexist in one search
MODEL_SEEDS = {"mlp": (3, 3.5), "transformer": (1, 2.5)}


def official_model(kind, vocab_size, seed=0, stop_scale=2.5, prefix_size=None):
    """An official ClipCaptionModel for a released layout; random GPT-2 weights, with the '.' token's
    (tied) embedding lengthened so that '.' wins in some contexts and captions end at various lengths."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=WIDTH, n_layer=N_LAYER, n_head=N_HEAD, n_positions=N_POS,
                     initializer_range=0.1, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    spec = dict(RELEASED[kind])
    if prefix_size is not None:
        spec["prefix_size"] = prefix_size
    model = ClipCaptionModel(gpt_config=cfg, mapping_type=kind, **spec)
    with torch.no_grad():
        model.gpt.transformer.wte.weight[13] *= stop_scale
    return model.eval()


def save_official(model, path, mask_dtype):
    """What train.py writes: torch.save(model.state_dict()), plus the buffers old GPT-2 carried."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(old_transformers_buffers(sd, N_LAYER, N_POS, mask_dtype), path)
    return path


class FeatureScorer:
    """CLIP stand-in for Captioner (these tests start from CLIP features): text embeddings only."""
    spec, device = "features", torch.device("cpu")

    def __init__(self, dim):
        self.dim = dim

    def encode_texts(self, texts):
        return nnf.normalize(torch.ones(len(texts), self.dim), dim=-1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on a shared CPU: one thread (tests/conftest.py)."""
    yield


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_layout_tok")
    gpt2_layout_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory, tok_dir):
    """kind -> (official model, checkpoint path, imported clipkit model, tokenizer)."""
    tok = GPT2Tokenizer.from_pretrained(str(tok_dir))
    d = tmp_path_factory.mktemp("official_ckpt")
    out = {}
    for kind, name, mask_dtype in (("mlp", "coco_weights.pt", torch.uint8),
                                   ("transformer", "transformer_weights.pt", torch.bool)):
        seed, scale = MODEL_SEEDS[kind]
        model = official_model(kind, len(tok), seed, scale)
        path = save_official(model, d / name, mask_dtype)
        # the official notebooks load the file into a fresh model: do the same (strict, except for the
        # two buffers today's GPT-2 no longer has)
        fresh = official_model(kind, len(tok), seed=99, stop_scale=1.0)
        missing, unexpected = fresh.load_state_dict(torch.load(path, weights_only=True), strict=False)
        assert not missing and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in unexpected)
        imported, itok = import_official(path, tokenizer=tok_dir)
        out[kind] = (fresh.eval(), path, imported, itok)
    return out


def features(kind, n=N_FEATURES, seed=5):
    g = torch.Generator().manual_seed(seed)
    dim = RELEASED[kind]["prefix_size"]
    return torch.randn(n, dim, generator=g) * 3.0        # not unit norm: normalisation must matter


# ==== the conformance rows ========================================================================

@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_imported_config_is_the_official_inference(official, kind):
    _, _, model, _ = official[kind]
    cfg = model.cfg
    assert cfg.mapper == kind and cfg.stop_token == "." and cfg.max_tokens == 67 and cfg.stop_at_eos is False
    if kind == "mlp":       # coco/conceptual: ViT-B/32 raw features, prefix 10
        assert (cfg.clip_dim, cfg.prefix_length, cfg.normalize_prefix) == (512, 10, False)
        assert cfg.clip_spec == "openclip:ViT-B-32-quickgelu/openai"
        assert cfg.decoder_trainable
    else:                   # transformer_weights.pt: RN50x4, L2-normalised, prefix 40, clip length 40, 8 layers
        assert (cfg.clip_dim, cfg.prefix_length, cfg.clip_length, cfg.mapper_layers, cfg.mapper_heads,
                cfg.normalize_prefix) == (640, 40, 40, 8, 8, True)
        assert cfg.clip_spec == "openclip:RN50x4/openai"
        assert not any(p.requires_grad for p in model.gpt.parameters())


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_prefix_equals_the_official_mapper(official, kind):
    ref, _, model, _ = official[kind]
    x = features(kind)
    want = torch.cat([official_prefix_embed(ref, kind, f) for f in x])
    got = model.prefix(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if kind == "transformer":     # the normalisation is part of it: raw features give another prefix
        assert not torch.allclose(model.mapper(x), want, atol=1e-3)


def _clipkit_tokens(model, tok, x, strategy):
    cap = Captioner(model, tok, FeatureScorer(model.cfg.clip_dim), device="cpu")
    cfg = cap.decode_config(DecodeConfig(strategy=strategy, beams=5 if strategy == "beam" else 1,
                                         candidates=5 if strategy == "beam" else 1))
    assert cfg.max_length == 67          # the checkpoint's limit when the caller sets none
    prefix = model.prefix(x)
    seqs = decode(model.gpt, prefix, tok.eos_token_id, cfg, cap.stop_ids, stop_at_eos=cap.stop_at_eos)
    captions = [r.caption for r in cap.caption_embeddings(x, DecodeConfig(strategy=strategy, beams=5
                                                                          if strategy == "beam" else 1))]
    return [[s.tokens for s in row] for row in seqs], captions


def _as_clipkit_caption(tok, text):
    # clipkit prints tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return text.replace(EOS_TEXT, "").strip() if EOS_TEXT in text else text.strip()


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_greedy_equals_official_generate2(official, kind):
    ref, _, model, tok = official[kind]
    x = features(kind)
    got_tokens, got_captions = _clipkit_tokens(model, tok, x, "greedy")
    for i, f in enumerate(x):
        text, want = generate2(ref, tok, embed=official_prefix_embed(ref, kind, f))
        assert got_tokens[i] == [want], (kind, i)
        assert got_captions[i] == _as_clipkit_caption(tok, text)
        assert want[-1] == 13 or len(want) == 67


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_beam_equals_official_generate_beam(official, kind):
    ref, _, model, tok = official[kind]
    x = features(kind)
    got_tokens, got_captions = _clipkit_tokens(model, tok, x, "beam")
    ends = set()
    for i, f in enumerate(x):
        texts, want = generate_beam(ref, tok, embed=official_prefix_embed(ref, kind, f))
        assert got_tokens[i] == want, (kind, i)              # all 5 beams, in the official order
        assert got_captions[i] == _as_clipkit_caption(tok, texts[0])
        ends |= {"." if s[-1] == 13 else len(s) for s in want}
    assert ends == {".", 67}       # beams ended by '.' and by the limit were both exercised


def test_an_emitted_eos_does_not_stop_official_decoding(official):
    """generate2/generate_beam stop at '.' only: an EOS the model emits is an ordinary token."""
    ref, _, model, tok = official["mlp"]
    ref, model = copy.deepcopy(ref), copy.deepcopy(model)
    eos = tok.eos_token_id
    x = features("mlp", n=2, seed=11)
    with torch.no_grad():     # make EOS likely in both models (the same edit)
        for m in (ref.gpt, model.gpt):
            m.transformer.wte.weight[eos] *= 8.0
    got, captions = _clipkit_tokens(model, tok, x, "greedy")
    for i, f in enumerate(x):
        text, want = generate2(ref, tok, embed=official_prefix_embed(ref, "mlp", f))
        assert got[i] == [want]
        assert captions[i] == _as_clipkit_caption(tok, text)
        assert eos in want[:-1] and len(want) == 67      # EOS inside the caption, decoding went on


def test_the_caller_can_override_the_token_limit(official):
    _, _, model, tok = official["mlp"]
    cap = Captioner(model, tok, FeatureScorer(512), device="cpu")
    assert cap.decode_config(DecodeConfig(strategy="greedy", max_length=5)).max_length == 5
    seqs = decode(model.gpt, model.prefix(features("mlp", 2)), tok.eos_token_id,
                  cap.decode_config(DecodeConfig(strategy="greedy", max_length=5)), cap.stop_ids,
                  stop_at_eos=False)
    assert all(len(r[0].tokens) <= 5 for r in seqs)


def test_wrong_clip_width_is_a_one_line_error(official):
    _, _, model, tok = official["transformer"]
    with pytest.raises(ModelLoadError) as e:      # a 512-d CLIP (ViT-B/32) for the 640-d RN50x4 mapper
        Captioner(model, tok, FeatureScorer(512), device="cpu")
    assert "640" in str(e.value) and "512" in str(e.value) and "RN50x4" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="640-d"):
        model.prefix(torch.randn(2, 512))


# ==== through the CLI, from images ===============================================================

def _images(tmp_path):
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import sample_scene
    paths = []
    for i, im in enumerate(render_pil([sample_scene(i) for i in range(2)], 32)):
        paths.append(tmp_path / f"img{i}.png")
        im.save(paths[-1])
    return paths


def test_cli_captions_images_as_the_official_pipeline(official, tok_dir, tiny_openclip_dir, tmp_path):
    """An official-layout transformer checkpoint on a (tiny) CLIP: clipkit's CLI output equals the
    official pipeline: preprocess -> encode_image -> prefix / norm -> clip_project -> generate_beam."""
    import open_clip
    from PIL import Image
    tok = GPT2Tokenizer.from_pretrained(str(tok_dir))
    ref = official_model("transformer", len(tok), *MODEL_SEEDS["transformer"], prefix_size=32)   # a 32-d CLIP
    ckpt = save_official(ref, tmp_path / "transformer_weights.pt", torch.bool)
    clip_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_openclip_dir}")
    clip_model.eval()
    paths = _images(tmp_path)
    runner = CliRunner()
    from clipkit.cli.main import cli
    for strategy in ("greedy", "beam"):
        r = runner.invoke(cli, ["-q", "caption", *map(str, paths), "--captioner", str(ckpt), "--tokenizer",
                                str(tok_dir), "--clip", str(tiny_openclip_dir), "--strategy", strategy, "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.output)
        assert doc["decode"]["max_length"] == 67
        for p, res in zip(paths, doc["results"]):
            with torch.no_grad():
                feat = clip_model.encode_image(preprocess(Image.open(p).convert("RGB")).unsqueeze(0))[0]
            embed = official_prefix_embed(ref, "transformer", feat)
            text = generate2(ref, tok, embed=embed)[0] if strategy == "greedy" else \
                generate_beam(ref, tok, embed=embed)[0][0]
            assert res["caption"] == _as_clipkit_caption(tok, text), (strategy, p)


def test_cli_wrong_clip_for_the_checkpoint_exits_2(official, tok_dir, tiny_openclip_dir, tmp_path):
    from clipkit.cli.main import cli
    _, ckpt, _, _ = official["transformer"]          # 640-d mapper, a 32-d CLIP
    paths = _images(tmp_path)
    r = CliRunner().invoke(cli, ["-q", "caption", str(paths[0]), "--captioner", str(ckpt), "--tokenizer",
                                 str(tok_dir), "--clip", str(tiny_openclip_dir)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "640" in lines[0] and "RN50x4" in lines[0]
