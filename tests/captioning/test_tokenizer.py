"""captioning.tokenizer: a small byte-level BPE trained on captions, saved and reloaded; captions
encoded as EOS-terminated, right-padded, masked rows."""
import pytest

from clipkit.captioning.tokenizer import EOS, encode_captions, load_tokenizer, train_bpe_tokenizer

CAPTIONS = ["a red circle at the top left", "a blue square in the center", "a small green triangle"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CAPTIONS, vocab_size=300)


def test_trained_tokenizer_round_trips_and_uses_eos_for_everything(tok):
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS and len(tok) <= 300
    for s in ("a red circle", "an unseen Émoji 🙂 string"):          # byte level: anything round-trips
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert len(tok("a red circle at the top left")["input_ids"]) < len("a red circle at the top left")


def test_encode_captions_pads_masks_and_truncates(tok):
    ids, mask = encode_captions(tok, ["a red circle at the top left", "a"], max_tokens=64)
    eos = tok.eos_token_id
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    assert ids.shape == mask.shape == (2, n0) and n1 < n0
    assert ids[0, n0 - 1] == eos and ids[1, n1 - 1] == eos and (ids[1, n1:] == eos).all() and not mask[1, n1:].any()
    short, m = encode_captions(tok, ["a red circle at the top left"], max_tokens=3)
    assert short.shape == (1, 3) and short[0, -1] == eos and m.all()


def test_saved_tokenizer_reloads_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.eos_token_id
    s = "a blue square in the center"
    assert again(s)["input_ids"] == tok(s)["input_ids"]
