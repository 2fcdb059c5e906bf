"""ClipCap model and batched decoding, on tiny random GPT-2s built from configs."""
import pytest
import torch

from clipkit.captioning.decode import DecodeConfig, decode, reference_beam_search
from clipkit.captioning.model import CaptionerConfig, ClipCapModel
from clipkit.core.errors import InputError

TINY_GPT = dict(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
EOS = 0


def tiny_model(mapper="mlp", seed=0, **kw) -> ClipCapModel:
    torch.manual_seed(seed)
    cfg = CaptionerConfig(mapper=mapper, clip_dim=16, prefix_length=4, clip_length=3, mapper_layers=2,
                          mapper_heads=4, decoder=dict(TINY_GPT), **kw)
    return ClipCapModel(cfg).eval()


def test_loss_on_caption_tokens_only_with_a_mask():
    m = tiny_model()
    e = torch.randn(2, 16)
    ids = torch.tensor([[5, 0, 7, EOS], [9, 3, EOS, EOS]])   # token 0 inside row 0 is real (mask 1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    res = m(e, ids, mask)
    # reference: run GPT-2 on [prefix, tokens] and score every real caption token (not pad, not prefix)
    prefix = m.prefix(e)
    emb = torch.cat([prefix, m.gpt.get_input_embeddings()(ids)], 1)
    logits = m.gpt(inputs_embeds=emb, attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1)).logits
    lp = logits[:, 3:-1].log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    want = -(lp * mask).sum() / mask.sum()
    assert res.n_tokens.item() == 7
    assert torch.allclose(res.loss, want, atol=1e-5)
    # extra padding changes nothing
    ids2 = torch.cat([ids, torch.full((2, 3), EOS)], 1)
    mask2 = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)
    assert torch.allclose(m(e, ids2, mask2).loss, res.loss, atol=1e-5)


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_prefix_shapes_and_which_parts_train(mapper):
    m = tiny_model(mapper)
    assert m.prefix(torch.randn(3, 16)).shape == (3, 4, 32)
    gpt_trainable = any(p.requires_grad for p in m.gpt.parameters())
    assert gpt_trainable == (mapper == "mlp")          # official: MLP fine-tunes GPT-2, transformer freezes it
    assert all(p.requires_grad for p in m.mapper.parameters())
    m.train()
    assert m.gpt.training == (mapper == "mlp")


def test_normalize_prefix_makes_scale_irrelevant():
    m = tiny_model(normalize_prefix=True)
    e = torch.randn(2, 16)
    assert torch.allclose(m.prefix(e), m.prefix(7.0 * e), atol=1e-5)
    raw = tiny_model(normalize_prefix=False)
    assert not torch.allclose(raw.prefix(e), raw.prefix(7.0 * e), atol=1e-3)


def _greedy_nocache(gpt, prefix, steps):
    toks = []
    for _ in range(steps):
        x = prefix if not toks else torch.cat([prefix, gpt.get_input_embeddings()(torch.tensor([toks]))], 1)
        t = int(gpt(inputs_embeds=x).logits[0, -1].argmax())
        toks.append(t)
        if t == EOS:
            break
    return toks[:-1] if toks and toks[-1] == EOS else toks


def test_greedy_batched_with_cache_equals_one_at_a_time_without_cache():
    m = tiny_model(seed=1)
    prefix = m.prefix(torch.randn(5, 16))
    out = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="greedy", max_length=12))
    for i in range(5):
        assert out[i][0].tokens == _greedy_nocache(m.gpt, prefix[i:i + 1], 12)


@pytest.mark.parametrize("seed", [2, 3])
def test_beam_batched_equals_official_algorithm_per_image(seed):
    m = tiny_model(seed=seed)
    prefix = m.prefix(torch.randn(4, 16))
    cfg = DecodeConfig(strategy="beam", beams=4, candidates=4, max_length=10)
    out = decode(m.gpt, prefix, EOS, cfg)
    for i in range(4):
        ref = reference_beam_search(m.gpt, prefix[i:i + 1], EOS, beams=4, max_length=10)
        assert [s.tokens for s in out[i]] == [s.tokens for s in ref]
        for a, b in zip(out[i], ref):
            assert a.length == b.length and abs(a.logprob - b.logprob) < 1e-4


def test_beam_results_do_not_depend_on_batch_composition():
    m = tiny_model(seed=4)
    prefix = m.prefix(torch.randn(6, 16))
    cfg = DecodeConfig(strategy="beam", beams=3, max_length=10)
    full = decode(m.gpt, prefix, EOS, cfg)
    part = decode(m.gpt, prefix[2:5], EOS, cfg)
    assert [r[0].tokens for r in full[2:5]] == [r[0].tokens for r in part]


def test_beam_one_is_greedy_and_logprobs_are_consistent():
    m = tiny_model(seed=5)
    prefix = m.prefix(torch.randn(3, 16))
    g = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="greedy", max_length=10))
    b = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="beam", beams=1, max_length=10))
    assert [r[0].tokens for r in g] == [r[0].tokens for r in b]
    # the reported log-prob is the sum over the generated tokens (+ EOS when it ended)
    s = g[0][0]
    toks = s.tokens + ([EOS] if s.length > len(s.tokens) else [])
    x = torch.cat([prefix[:1], m.gpt.get_input_embeddings()(torch.tensor([toks]))], 1)
    lp = m.gpt(inputs_embeds=x).logits[0, 3:-1].log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).sum()
    assert abs(lp.item() - s.logprob) < 1e-4


def test_nucleus_is_seeded_and_top_k_one_is_greedy():
    m = tiny_model(seed=6)
    prefix = m.prefix(torch.randn(2, 16))
    cfg = DecodeConfig(strategy="nucleus", candidates=4, top_p=1.0, temperature=1.5, max_length=10, seed=7)
    a = decode(m.gpt, prefix, EOS, cfg)
    b = decode(m.gpt, prefix, EOS, cfg)
    assert [[s.tokens for s in r] for r in a] == [[s.tokens for s in r] for r in b]
    c = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="nucleus", candidates=4, top_p=1.0,
                                                 temperature=1.5, max_length=10, seed=8))
    assert [[s.tokens for s in r] for r in a] != [[s.tokens for s in r] for r in c]
    assert len({tuple(s.tokens) for s in a[0]}) > 1                  # samples differ from each other
    g = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="greedy", max_length=10))
    k1 = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="nucleus", top_k=1, max_length=10, seed=1))
    assert [r[0].tokens for r in g] == [r[0].tokens for r in k1]


def test_stop_token_ends_the_caption():
    m = tiny_model(seed=1)
    prefix = m.prefix(torch.randn(3, 16))
    free = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="greedy", max_length=12))
    stop = free[0][0].tokens[1] if len(free[0][0].tokens) > 1 else free[0][0].tokens[0]
    out = decode(m.gpt, prefix, EOS, DecodeConfig(strategy="greedy", max_length=12), stop_ids=(stop,))
    assert out[0][0].tokens[-1] == stop and stop not in out[0][0].tokens[:-1]


@pytest.mark.parametrize("kw", [dict(strategy="sample"), dict(beams=0), dict(strategy="beam", beams=2, candidates=3),
                                dict(strategy="greedy", candidates=2), dict(strategy="nucleus", top_p=0.0),
                                dict(temperature=0.0)])
def test_bad_decode_configs(kw):
    with pytest.raises(InputError):
        DecodeConfig(**kw).validate()
