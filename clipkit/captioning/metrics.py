"""Caption metrics: BLEU-1..4, ROUGE-L, CIDEr-D (as the COCO caption evaluation computes them) and
CLIP-S / RefCLIP-S (Hessel et al. 2021). Pure Python + torch; no Java.

Scales (the COCO toolkit's, which papers multiply by 100): BLEU and ROUGE-L in [0, 1]; CIDEr-D in
[0, 10] (ClipCap's "CIDEr 113.08" is 1.1308 here). CLIP-S = 2.5 * max(cos, 0) in [0, 2.5];
RefCLIP-S is the harmonic mean of CLIP-S and the unscaled text-text part, so it lies in [0, 1.43].

Definitions follow pycocoevalcap (``Bleu(4)``, ``Rouge``, ``Cider``), including its quirks:

* BLEU is corpus-level: clipped n-gram matches and candidate n-gram counts are summed over all
  images, BLEU-n is the geometric mean of the n precisions 1..n; the brevity penalty uses the sum
  over images of the reference length closest to the candidate's (ties: the shorter). Like the
  toolkit, 1e-15 / 1e-9 are added to numerator / denominator, so "no 4-gram match" gives a tiny
  positive BLEU-4 (~1e-5, printed 0.0000) rather than 0.
* ROUGE-L is F_beta (beta = 1.2) of the *largest* LCS precision and the *largest* LCS recall over the
  references (which may come from different references), averaged over images.
* CIDEr-D: tf-idf vectors of 1..4-grams with raw counts as tf and idf = log(N) - log(max(1, df)),
  where df counts the images whose references contain the n-gram and N is the number of evaluated
  images (so a one-image corpus scores 0). Per n: sum over candidate n-grams of
  min(h, r) * r, divided by the norms (0 when a norm is 0), times exp(-delta^2 / (2 * 6^2)); delta is
  the difference in *bigram* counts (the toolkit's length), i.e. in tokens for captions of >= 2
  tokens. Mean over n, mean over references, times 10; mean over images.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import torch

from clipkit.core.errors import InputError
from clipkit.core.io import read_text_file

Tokens = list[str]

#: Tokens the COCO tokenizer drops after PTB tokenisation (quotes, brackets, punctuation).
PUNCTUATION_TOKENS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                                ".", "?", "!", ",", ":", "-", "--", "...", ";"])
#: Hessel et al.'s text prompt for CLIP-S with ViT-B/32. Off by default: the bundled Shapes CLIP was
#: trained on bare Shapes captions, and a prefix it never saw only adds noise.
HESSEL_PREFIX = "A photo depicts"
CLIP_S_WEIGHT = 2.5

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00b4": "'"})
_DROP_CHARS = re.compile(r'["`()\[\]{}]')              # quotes and brackets become dropped tokens in PTB
_ALWAYS_SPLIT = re.compile(r"(\.\.\.|--|[?!;])")
_SOFT_SPLIT = re.compile(r"(?<!\d)[,:]|[,:](?!\d)")      # 1,000 and 10:30 stay whole
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def coco_tokenize(text: str) -> Tokens:
    """COCO-evaluation tokenisation: lower-case, PTB-style splitting, punctuation tokens removed.

    A pure-Python stand-in for Stanford PTBTokenizer (CoreNLP 3.4.1, ``-lowerCase``) + pycocoevalcap's
    punctuation filter. Clitics split as PTB does ("dog's" -> dog 's, "don't" -> do n't, "cannot" ->
    can not); hyphenated
    words, decimals, "1,000" and dotted abbreviations ("u.s.") stay whole; other symbols are left
    attached (PTB would split e.g. "50%"), a rare difference in captions.
    """
    if not isinstance(text, str):
        raise InputError(f"caption is {type(text).__name__}, expected a string")
    text = _DROP_CHARS.sub(" ", text.lower().translate(_QUOTES))
    text = _SOFT_SPLIT.sub(" ", _ALWAYS_SPLIT.sub(" ", text))
    out: Tokens = []
    for chunk in text.split():
        word = chunk.lstrip("'-")
        if word.endswith(".") and "." not in word[:-1]:      # sentence period, not "u.s."
            word = word[:-1]
        word = word.rstrip("-")
        m = _CLITIC.match(word)
        parts = [m.group(1), m.group(2)] if m else ["can", "not"] if word == "cannot" else [word]
        for p in parts:
            if p.endswith("'") and p not in PUNCTUATION_TOKENS:  # plural possessive: dogs' -> dogs '
                p = p.rstrip("'")
            if p and p not in PUNCTUATION_TOKENS and p.strip(".'-"):
                out.append(p)
    return out


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (tuples) of a token list."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


# ---- BLEU ---------------------------------------------------------------------------------------

def corpus_bleu(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
                max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as pycocoevalcap's ``Bleu`` (closest reference length)."""
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidates but {len(references)} reference lists")
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        max_ref = Counter()
        for r in refs:
            max_ref |= ngrams(r, max_n)                         # per-n-gram max over references
        for gram, count in ngrams(cand, max_n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(max_n):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    ratio = (cand_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, prod = [], 1.0
    for k in range(max_n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1 / (k + 1)) * penalty)
    return scores


# ---- ROUGE-L ------------------------------------------------------------------------------------

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Tokens, references: Sequence[Tokens], beta: float = 1.2) -> float:
    """pycocoevalcap ROUGE-L of one candidate: F_beta of max LCS precision and max LCS recall."""
    if not candidate:
        return 0.0
    lcs = [lcs_length(r, candidate) for r in references]
    prec = max(v / len(candidate) for v in lcs)
    rec = max(v / len(r) for v, r in zip(lcs, references))
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec)


# ---- CIDEr-D ------------------------------------------------------------------------------------

def _tfidf(counts: Counter, df: Counter, log_n: float, n: int):
    vec = [dict() for _ in range(n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
    n_bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, n_bigrams


def cider_d_scores(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
                   n: int = 4, sigma: float = 6.0) -> list[float]:
    """Per-image CIDEr-D (pycocoevalcap ``Cider``); df over the references of this corpus."""
    cand_counts = [ngrams(c, n) for c in candidates]
    ref_counts = [[ngrams(r, n) for r in refs] for refs in references]
    if len(cand_counts) != len(ref_counts):
        raise InputError(f"{len(cand_counts)} candidates but {len(ref_counts)} reference lists")
    df = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_n = math.log(len(ref_counts)) if ref_counts else 0.0
    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        hv, hn, hlen = _tfidf(cand, df, log_n, n)
        total = 0.0
        for ref in refs:
            rv, rn, rlen = _tfidf(ref, df, log_n, n)
            penalty = math.exp(-((hlen - rlen) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(h, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, h in hv[k].items())
                if hn[k] != 0 and rn[k] != 0:
                    dot /= hn[k] * rn[k]
                total += dot * penalty
        scores.append(10.0 * total / n / len(refs))
    return scores


# ---- corpus evaluation --------------------------------------------------------------------------

@dataclass
class CaptionMetrics:
    """Corpus caption metrics (COCO-toolkit scales; see the module docstring)."""
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    rouge_l: float
    cider_d: float
    n_images: int
    clip_s: float | None = None        # mean 2.5 * max(cos, 0)
    ref_clip_s: float | None = None    # mean harmonic mean of CLIP-S and max reference text cosine

    def to_dict(self) -> dict:
        return asdict(self)


def _check_inputs(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]):
    if not candidates:
        raise InputError("no candidate captions to evaluate")
    missing = [k for k in candidates if k not in references]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise InputError(f"{len(missing)} image(s) have no references: {shown}")
    for k in candidates:
        refs = references[k]
        if not isinstance(refs, (list, tuple)):
            raise InputError(f"references of {k!r} must be a list of strings, got {type(refs).__name__}")
        if not refs:
            raise InputError(f"references of {k!r} are empty: give at least one reference caption")


def tokenize_corpus(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]):
    """Validated, tokenised ``(keys, candidate tokens, reference token lists)`` in candidate order."""
    _check_inputs(candidates, references)
    keys = list(candidates)
    cands = [coco_tokenize(candidates[k]) for k in keys]
    refs = []
    for k in keys:
        toks = [coco_tokenize(r) for r in references[k]]
        if any(not t for t in toks):
            raise InputError(f"a reference of {k!r} has no words after tokenisation")
        refs.append(toks)
    return keys, cands, refs


def evaluate_captions(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                      scorer=None, images: Mapping[Hashable, object] | None = None,
                      prefix: str = "") -> CaptionMetrics:
    """BLEU-1..4, ROUGE-L and CIDEr-D of ``{key: caption}`` against ``{key: [references]}``.

    Only the candidates' keys are evaluated (extra reference keys are ignored; CIDEr-D's document
    frequencies come from the evaluated images' references). With a ``scorer`` (ClipScorer) and
    ``images`` (``{key: image}``), CLIP-S and RefCLIP-S are filled in too.
    """
    keys, cands, refs = tokenize_corpus(candidates, references)
    b = corpus_bleu(cands, refs, 4)
    rouge = sum(rouge_l(c, r) for c, r in zip(cands, refs)) / len(keys)
    cider = sum(cider_d_scores(cands, refs)) / len(keys)
    out = CaptionMetrics(*b, rouge_l=rouge, cider_d=cider, n_images=len(keys))
    if scorer is not None:
        if images is None or any(k not in images for k in keys):
            raise InputError("CLIP-S needs an image for every evaluated key")
        rc = ref_clip_s(scorer, [images[k] for k in keys], [candidates[k] for k in keys],
                        [list(references[k]) for k in keys], prefix=prefix)
        out.clip_s, out.ref_clip_s = rc.mean_clip_s, rc.mean_ref_clip_s
    return out


# ---- CLIP-S / RefCLIP-S -------------------------------------------------------------------------

def _prompt(texts: Sequence[str], prefix: str) -> list[str]:
    if not prefix:
        return list(texts)
    prefix = prefix if prefix.endswith(" ") else prefix + " "
    return [prefix + t for t in texts]


def _clip_s_from(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float) -> torch.Tensor:
    return w * (image_emb * text_emb).sum(-1).clamp(min=0)


def clip_s(scorer, images, captions: Sequence[str], prefix: str = "", w: float = CLIP_S_WEIGHT) -> torch.Tensor:
    """Per-image CLIP-S = w * max(cos(image, caption), 0), fp32 ``[N]`` (Hessel et al. 2021, w = 2.5).

    ``prefix`` is prepended to every caption (Hessel: ``HESSEL_PREFIX``, "A photo depicts", with
    ViT-B/32); default none, which suits the bundled Shapes CLIP.
    """
    captions = list(captions)
    img = scorer.encode_images(images)
    if len(img) != len(captions):
        raise InputError(f"{len(img)} images but {len(captions)} captions")
    return _clip_s_from(img.cpu(), scorer.encode_texts(_prompt(captions, prefix)).cpu(), w)


@dataclass
class RefClipScores:
    """Per-image CLIP-S, text-reference similarity and RefCLIP-S (fp32 ``[N]`` tensors)."""
    clip_s: torch.Tensor       # w * max(cos(image, candidate), 0)
    ref_sim: torch.Tensor      # max(max_r cos(candidate, r), 0), unscaled
    ref_clip_s: torch.Tensor   # harmonic mean of the two (0 where either is 0)

    @property
    def mean_clip_s(self) -> float:
        return self.clip_s.mean().item()

    @property
    def mean_ref_clip_s(self) -> float:
        return self.ref_clip_s.mean().item()

    def to_dict(self) -> dict[str, float]:
        """Corpus means, ``{"clip_s": ..., "ref_clip_s": ...}``."""
        return {"clip_s": self.mean_clip_s, "ref_clip_s": self.mean_ref_clip_s}

    def items(self):
        """``to_dict().items()``, for callers that merge the scores into a report."""
        return self.to_dict().items()


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise 2ab / (a + b) of non-negative tensors; 0 where a + b == 0."""
    s = a + b
    return torch.where(s > 0, 2 * a * b / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))


def ref_clip_s(scorer, images, captions: Sequence[str], references: Sequence[Sequence[str]],
               prefix: str = "", w: float = CLIP_S_WEIGHT) -> RefClipScores:
    """RefCLIP-S (Hessel et al. 2021): H-Mean(CLIP-S(c, v), max(max_r cos(c, r), 0)).

    CLIP-S carries the w = 2.5 factor, the text-text part does not (as in the paper and its code), so
    RefCLIP-S <= 2 * 2.5 / 3.5 = 1.43. ``prefix`` applies to candidates and references alike.
    """
    captions, references = list(captions), [list(r) for r in references]
    if len(captions) != len(references):
        raise InputError(f"{len(captions)} captions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if not refs:
            raise InputError(f"reference list #{i} is empty: give at least one reference caption")
    img = scorer.encode_images(images)
    if len(img) != len(captions):
        raise InputError(f"{len(img)} images but {len(captions)} captions")
    cand = scorer.encode_texts(_prompt(captions, prefix))
    flat = scorer.encode_texts(_prompt([r for refs in references for r in refs], prefix))
    img, cand, flat = img.cpu(), cand.cpu(), flat.cpu()
    per_image = flat.split([len(r) for r in references])                      # [R_i, D] each
    best = torch.stack([(refs @ c).max() for c, refs in zip(cand, per_image)])
    cs = _clip_s_from(img, cand, w)
    ref_sim = best.clamp(min=0)
    return RefClipScores(cs, ref_sim, harmonic_mean(cs, ref_sim))


# ---- references from a file ---------------------------------------------------------------------

def read_references(path) -> dict[str, list[str]]:
    """A JSON object ``{image path, file name or stem: [reference captions]}``."""

    try:
        doc = json.loads(read_text_file(path, "references"))
    except json.JSONDecodeError as e:
        raise InputError(f"cannot read references {path}: {e}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise InputError(f"{path}: expected a JSON object {{image: [reference captions]}}")
    return {k: [str(c) for c in v] for k, v in doc.items()}


def match_references(sources: Sequence[str], references: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``{source: its references}`` for the image paths that have some, looked up by the path itself,
    else its file name, else its stem; raises InputError when none has."""
    out = {}
    for s in sources:
        key = next((k for k in (s, Path(s).name, Path(s).stem) if k in references), None)
        if key is not None:
            out[s] = list(references[key])
    if not out:
        raise InputError("--eval: none of the images has references (keys: path, file name or stem)")
    return out
