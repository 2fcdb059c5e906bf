"""Tokenizers for the GPT-2 decoder: GPT-2's own (hub or local dir), or a small byte-level BPE
trained on a caption corpus with the ``tokenizers`` library (the bundled Shapes captioner's)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

# Imported where used: tokenizers, torch, transformers (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``; EOS doubles as BOS/PAD/UNK.
    Byte-level, so any string round-trips (decode(encode(s)) == s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=EOS)


def load_tokenizer(path_or_repo: str | Path, local_only: bool = True):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path_or_repo), local_files_only=local_only)
    if tok.eos_token_id is None:
        tok.eos_token = EOS
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_captions(tokenizer, captions: list[str], max_tokens: int):
    """Caption strings -> (input_ids, attention_mask) [B, T], each caption followed by EOS,
    right-padded (pad positions masked; the loss ignores them), truncated to ``max_tokens``."""
    import torch
    eos = tokenizer.eos_token_id
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"][:max_tokens - 1] + [eos] for c in captions]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), eos, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask
