"""The ClipCap model: mapper prefixes and the caption loss, on tiny random GPT-2s built from configs."""
import pytest
import torch
from helpers import tiny_clipcap as tiny_model

EOS = 0


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
