"""CLIP backends: one small protocol over open_clip and transformers models.

A backend owns a model, its tokenizer and its preprocessing settings. It maps normalised pixel
tensors and strings to *unnormalised* embeddings; normalisation, fp32 scoring and batching live in
:class:`clipkit.core.scorer.ClipScorer`, once for every backend.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from clipkit.core.errors import InputError
from clipkit.core.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


class ClipBackend(Protocol):
    spec: str
    module: nn.Module
    preprocess: PreprocessConfig
    context_length: int

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...          # [B,3,S,S] -> [B,D]
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...           # M strings -> [M,D]
    def logit_scale(self) -> float: ...


@dataclass
class Tokenized:
    ids: torch.Tensor                          # [M, L] int64
    attention_mask: torch.Tensor | None = None  # [M, L] or None (open_clip finds EOT by argmax)


def check_texts(texts: Sequence[str]) -> list[str]:
    """Validate a list of texts: non-empty list of non-blank strings."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise InputError("no texts given: pass at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text #{i} is {type(t).__name__}, expected a string")
        if not t.strip():
            raise InputError(f"text #{i} is empty: every text must contain words")
    return texts


def warn_truncated(texts: Sequence[str], lengths: Sequence[int], context_length: int) -> None:
    """Tokenizers truncate silently at the context length; we say so (FIELD_NOTES A)."""
    for text, n in zip(texts, lengths):
        if n > context_length:
            short = text if len(text) <= 60 else text[:57] + "..."
            log.warning("text truncated to the model's %d-token context (%d tokens): %r",
                        context_length, n, short)


def openclip_tokenize(tok: Callable, texts: Sequence[str], context_length: int) -> Tokenized:
    """Token ids of an open_clip tokenizer, warning about truncation (open_clip truncates silently)."""
    if not (hasattr(tok, "encode") and hasattr(tok, "sot_token_id")
            and getattr(tok, "reduction_fn", None) is None):
        return Tokenized(tok(list(texts)))        # HF-based or reducing tokenizers: as they are
    # CLIP BPE: encode once, warn about truncation, then lay out ids exactly as open_clip does
    # (sot + tokens + eot, cut at the context length with eot kept last).
    seqs = [[tok.sot_token_id] + tok.encode(t) + [tok.eot_token_id] for t in texts]
    warn_truncated(texts, [len(s) for s in seqs], context_length)
    ids = torch.zeros(len(seqs), context_length, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > context_length:
            s = s[:context_length]
            s[-1] = tok.eot_token_id
        ids[i, :len(s)] = torch.tensor(s)
    return Tokenized(ids)


class OpenClipBackend:
    """An ``open_clip`` CLIP (any architecture, incl. the bundled Shapes model)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, preprocess: PreprocessConfig, spec: str):
        self.spec, self.module, self.tokenizer, self.preprocess = spec, model.eval(), tokenizer, preprocess
        self.context_length = int(getattr(tokenizer, "context_length", None) or 77)

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        return openclip_tokenize(self.tokenizer, texts, self.context_length)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.encode_image(pixels)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.module.parameters()).device
        return self.module.encode_text(self.tokenize(texts).ids.to(device))

    def logit_scale(self) -> float:
        return float(self.module.logit_scale.detach().float().exp())


def _features(out) -> torch.Tensor:
    """transformers 4 returns a tensor, 5 may return an output object (FIELD_NOTES A)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipBackend:
    """A transformers ``CLIPModel`` with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: PreprocessConfig, spec: str):
        self.spec, self.module, self.tokenizer, self.preprocess = spec, model.eval(), tokenizer, preprocess
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        lengths = [len(self.tokenizer(t, truncation=False)["input_ids"]) for t in texts]
        warn_truncated(texts, lengths, self.context_length)
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="pt")
        return Tokenized(enc["input_ids"], enc["attention_mask"])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.visual_projection(_features(self.module.vision_model(pixel_values=pixels)))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenize(texts)
        device = next(self.module.parameters()).device
        out = self.module.text_model(input_ids=tok.ids.to(device),
                                     attention_mask=tok.attention_mask.to(device))
        return self.module.text_projection(_features(out))

    def logit_scale(self) -> float:
        return float(math.exp(self.module.logit_scale.detach().float().item()))
