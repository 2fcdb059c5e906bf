"""core.backends: text validation, truncation warnings and open_clip token layout."""
import logging

import pytest
import torch

from clipkit.core.backends import check_texts, openclip_tokenize, warn_truncated
from clipkit.core.errors import InputError


def test_check_texts():
    assert check_texts("a red circle") == ["a red circle"]
    assert check_texts(("a", "b")) == ["a", "b"]
    with pytest.raises(InputError, match="no texts"):
        check_texts([])
    with pytest.raises(InputError, match="#1 is empty"):
        check_texts(["ok", "  "])
    with pytest.raises(InputError, match="#0 is int"):
        check_texts([3])


def test_warn_truncated_only_past_the_context(caplog):
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        warn_truncated(["short", "x" * 100], [5, 80], 77)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "77-token context (80 tokens)" in msgs[0] and "..." in msgs[0]


class _BPE:                    # the shape of open_clip's SimpleTokenizer: one token per word
    sot_token_id, eot_token_id, reduction_fn = 1, 2, None

    def encode(self, text):
        return [10 + len(w) for w in text.split()]


def test_openclip_tokenize_layout_and_truncation(caplog):
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        t = openclip_tokenize(_BPE(), ["a bb", "a b c d e"], context_length=5)
    assert t.attention_mask is None and t.ids.dtype == torch.long
    assert t.ids.tolist() == [[1, 11, 12, 2, 0], [1, 11, 11, 11, 2]]      # cut, EOT kept last
    assert len(caplog.records) == 1


def test_openclip_tokenize_passes_other_tokenizers_through():
    calls = []

    def hf_like(texts):
        calls.append(texts)
        return torch.ones(len(texts), 4, dtype=torch.long)
    t = openclip_tokenize(hf_like, ("a", "b"), context_length=4)
    assert calls == [["a", "b"]] and t.ids.shape == (2, 4)
