"""``Captioner``: CLIP scorer + ClipCap model + tokenizer -> captions, optionally CLIP-reranked.

Candidates (``DecodeConfig.candidates`` > 1) are reranked against their image with core's
ranking (:mod:`clipkit.core.ranking`: rerank's cosine and ordering rule, ties by text) by

    rank_score = cos(image, caption) + lm_weight * mean token log-prob

with the raw cosine in [-1, 1]. ``lm_weight = 0`` is pure CLIP reranking; a small
weight (the default 0.1) breaks ties between captions CLIP finds equally good in favour of fluent ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clipkit.captioning.decode import DecodeConfig, decode
from clipkit.captioning.model import ClipCapModel
from clipkit.core.errors import InputError, ModelLoadError


@dataclass
class Candidate:
    caption: str
    logprob: float         # mean token log-probability under the decoder
    clip_score: float      # cosine(image, caption) under the captioner's CLIP
    rank_score: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionResult:
    caption: str
    clip_score: float                 # cosine(image, caption), the scoring core's raw score
    logprob: float
    candidates: list[Candidate] = field(default_factory=list)
    source: str | None = None         # path of the image, when it came from a file

    def to_dict(self) -> dict:
        """``{path, caption, score (the cosine), logprob[, candidates]}``: candidates only when there
        were several, best first (what ``clipkit caption --json`` prints per image)."""
        d = {"path": self.source, "caption": self.caption, "score": self.clip_score, "logprob": self.logprob}
        if self.candidates:
            d["candidates"] = [c.to_dict() for c in self.candidates]
        return d


def decode_config(strategy: str = "beam", beams: int = 5, candidates: int = 1, **decode_kw) -> DecodeConfig:
    """A validated DecodeConfig for a strategy: beam search widens to at least ``candidates`` beams
    (it returns its best ``candidates`` beams); greedy and nucleus decode with one beam."""
    return DecodeConfig(strategy=strategy, beams=max(beams, candidates) if strategy == "beam" else 1,
                        candidates=candidates, **decode_kw).validate()


class Captioner:
    def __init__(self, model: ClipCapModel, tokenizer, scorer, device=None):
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.spec: str | None = None            # set by load_captioner
        self.device = device or scorer.device
        self.model.to(self.device).eval().requires_grad_(False)
        cfg = model.cfg
        dim = _embed_dim(scorer)
        if cfg.clip_dim != dim:
            raise ModelLoadError(scorer.spec, f"its {dim}-d embeddings do not fit the captioner's mapper, "
                                 f"which takes {cfg.clip_dim}-d CLIP embeddings",
                                 f"use --clip {cfg.clip_spec}, the CLIP it was trained with" if cfg.clip_spec
                                 else f"pass --clip with a {cfg.clip_dim}-d CLIP")
        self.eos_id = tokenizer.eos_token_id
        self.stop_at_eos = cfg.stop_at_eos
        self.set_stop_token(cfg.stop_token)

    def decode_config(self, cfg: DecodeConfig | None = None) -> DecodeConfig:
        """``cfg`` (default: beam 5) with its token limit resolved: the caller's ``max_length``, else
        the checkpoint's (official ClipCap: 67), else 40."""
        return (cfg or DecodeConfig()).with_max_length(self.model.cfg.max_tokens).validate()

    def set_stop_token(self, text: str | None) -> None:
        """End captions at this string's (last) token too, besides EOS (official models: ".")."""
        self.stop_ids = ()
        if text:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InputError(f"stop token {text!r} encodes to no token")
            self.stop_ids = tuple(ids[-1:])

    @torch.inference_mode()
    def image_embeddings(self, images) -> torch.Tensor:
        """Raw CLIP image features (the model normalises them itself if its config says so)."""
        return self.scorer.encode_images(images, normalize=False)

    @torch.inference_mode()
    def caption_embeddings(self, embeds: torch.Tensor, cfg: DecodeConfig | None = None,
                           lm_weight: float = 0.1, batch_size: int = 32,
                           generator: torch.Generator | None = None) -> list[CaptionResult]:
        cfg = self.decode_config(cfg)
        out: list[CaptionResult] = []
        for i in range(0, len(embeds), batch_size):
            e = embeds[i:i + batch_size].to(self.device)
            prefix = self.model.prefix(e).to(self.model.gpt.dtype)
            seqs = decode(self.model.gpt, prefix, self.eos_id, cfg, self.stop_ids, generator,
                          stop_at_eos=self.stop_at_eos)
            out += self._finish(F.normalize(e.float(), dim=-1), seqs, lm_weight)
        return out

    def _finish(self, img: torch.Tensor, seqs, lm_weight: float) -> list[CaptionResult]:
        """Score every candidate with core's ranking (cosine with its image, + lm_weight * mean
        log-prob) and order them by it, ties broken by the caption text."""
        from clipkit.core.ranking import cosines, order
        texts = [[self.tokenizer.decode(s.tokens, skip_special_tokens=True).strip() for s in row]
                 for row in seqs]
        flat = [t if t else " " for row in texts for t in row]
        txt = self.scorer.encode_texts(flat).cpu()
        results, j = [], 0
        for r, (row, caps) in enumerate(zip(seqs, texts)):
            cos = cosines(txt[j:j + len(row)], img[r:r + 1].cpu().to(txt.dtype))[:, 0]
            j += len(row)
            lp = torch.tensor([s.mean_logprob for s in row], dtype=cos.dtype)
            rank = cos + lm_weight * lp
            cands = [Candidate(c, s.mean_logprob, float(cs), float(rs))
                     for c, s, cs, rs in zip(caps, row, cos.tolist(), rank.tolist())]
            ordered = [cands[i] for i, _ in order(caps, rank, None)]
            best = ordered[0]
            results.append(CaptionResult(best.caption, best.clip_score, best.logprob,
                                         ordered if len(ordered) > 1 else []))
        return results

    @torch.inference_mode()
    def token_logprobs(self, images, texts: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """Teacher-forced log-probabilities of each text's tokens, then of ending the caption, given
        its image: one 1-D tensor per (image, text) pair (the last entry is the end)."""
        texts = list(texts)
        embeds = self.image_embeddings(images)
        if len(texts) != len(embeds):
            raise InputError(f"need one text per image, got {len(texts)} texts for {len(embeds)} images")
        end = self.eos_id if self.stop_at_eos or not self.stop_ids else self.stop_ids[0]
        out: list[torch.Tensor] = []
        for a in range(0, len(texts), batch_size):
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts[a:a + batch_size]]
            T = max(len(i) for i in ids)
            input_ids = torch.zeros(len(ids), T, dtype=torch.long)
            mask = torch.zeros(len(ids), T, dtype=torch.long)
            for r, i in enumerate(ids):
                input_ids[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            logits = self.model(embeds[a:a + batch_size].to(self.device), input_ids, mask).logits.float()
            lp = logits.log_softmax(-1).gather(-1, input_ids[..., None])[..., 0].cpu()
            out += [lp[r, :len(i)] for r, i in enumerate(ids)]
        return out

    def text_logprob(self, images, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """log P(text, then the end of the caption | image) [N], summed over tokens."""
        return torch.stack([lp.sum() for lp in self.token_logprobs(images, texts, batch_size)])

    def end_logprob(self, images, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """log P(the caption ends | image, text) [N]: low when the image holds more than the text
        says (the captioner wants to go on: "... and a blue square"), which a CLIP cosine misses."""
        return torch.stack([lp[-1] for lp in self.token_logprobs(images, texts, batch_size)])

    def caption(self, images, cfg: DecodeConfig | None = None, lm_weight: float = 0.1,
                batch_size: int = 32, generator: torch.Generator | None = None) -> list[CaptionResult]:
        """Caption PIL images, paths or a [B,3,H,W] tensor in [0, 1]."""
        embeds = self.image_embeddings(images)
        res = self.caption_embeddings(embeds, cfg, lm_weight, batch_size, generator)
        if not isinstance(images, torch.Tensor):
            items = [images] if isinstance(images, (str, Path)) else list(images)
            for r, im in zip(res, items):
                if isinstance(im, (str, Path)):
                    r.source = str(im)
        return res


@dataclass
class CaptionEndSelector:
    """Best-of selection for ``generate`` (its ``Selector`` protocol): the CLIP cosine plus
    ``weight`` times log P(the caption ends right after the prompt | image) under a captioner.

    A CLIP scores what an image holds, not what it holds *besides* the prompt; a captioner that
    wants to go on after the prompt ("... and a blue square") has seen more. ``weight`` was chosen
    on a development set of prompts (BENCHMARKS.md, "best-of selection")."""
    captioner: Captioner
    weight: float = 0.05
    name: str = "caption"           # what `generate --select` calls it; the sidecar's "selection"

    @property
    def spec(self) -> str | None:
        """The captioner's model spec (recorded with the other model specs)."""
        return getattr(self.captioner, "spec", None)

    def __call__(self, images, prompt: str, clip_scores: torch.Tensor) -> torch.Tensor:
        end = self.captioner.end_logprob(images, [prompt] * len(images))
        return clip_scores.float().cpu() + self.weight * end


def _embed_dim(scorer) -> int:
    with torch.inference_mode():
        return scorer.encode_texts(["a"]).shape[-1]


def load_captioner(spec: str = "shapes", clip: str | None = None, device="auto", precision: str = "fp32",
                   tokenizer: str | None = None, batch_size: int = 64) -> Captioner:
    """Resolve a captioner spec: ``shapes`` (bundled), a directory of ours, or an official ``.pt``
    (then ``tokenizer`` names a GPT-2 tokenizer dir/repo). ``clip`` defaults to the CLIP recorded in
    the captioner's config: for official checkpoints the one their mapper's width implies (OpenAI
    ViT-B/32 for the 512-d MLP ones, RN50x4 for the 640-d transformer_weights.pt)."""
    from clipkit.captioning.checkpoint import import_official, load_captioner_dir
    from clipkit.core.registry import resolve
    from clipkit.core.scorer import load_scorer
    path = Path(resolve(spec, "captioner").location)    # bundled or our directory, or an official .pt
    if path.is_dir():
        model, tok = load_captioner_dir(path)
    else:
        model, tok = import_official(path, tokenizer=tokenizer or "gpt2",
                                     local_only=tokenizer is not None and Path(tokenizer).is_dir())
    if tokenizer is not None and path.is_dir():
        from clipkit.captioning.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
    if not (clip or model.cfg.clip_spec):
        raise ModelLoadError(spec, f"the captioner does not record its CLIP (its mapper takes "
                             f"{model.cfg.clip_dim}-d embeddings)", f"pass --clip with a {model.cfg.clip_dim}-d CLIP")
    scorer = load_scorer(clip or model.cfg.clip_spec, device=device, precision=precision,
                         batch_size=batch_size)
    cap = Captioner(model, tok, scorer)
    cap.spec = spec
    return cap


def check_lm_weight(w: float) -> float:
    if not isinstance(w, (int, float)) or w != w or w < 0:
        raise InputError(f"lm_weight must be a non-negative number, got {w!r}")
    return float(w)


def caption(images, captioner: str | Captioner = "shapes", strategy: str = "beam", beams: int = 5,
            candidates: int = 1, lm_weight: float = 0.1, device="auto", **decode_kw) -> list[CaptionResult]:
    """One call: caption PIL images, paths or a [B,3,H,W] tensor with a captioner spec or object.

    >>> from clipkit import caption
    >>> caption(["examples/red_circle.png"])[0].caption      # doctest: +SKIP
    """
    cap = captioner if isinstance(captioner, Captioner) else load_captioner(captioner, device=device)
    cfg = decode_config(strategy, beams, candidates, **decode_kw)
    return cap.caption(images, cfg, lm_weight=check_lm_weight(lm_weight))
