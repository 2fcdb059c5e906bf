"""Prompt templates, prompt ensembling and zero-shot classification.

Ensemble (Radford et al. 2021, and open_clip's ``build_zero_shot_classifier``): embed every
template filled with a label, normalise each, average, renormalise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from clipkit.core.errors import InputError
from clipkit.core.io import read_text_file
from clipkit.core.scorer import load_scorer

# Imported where used: open_clip (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

Templates = Union[str, Sequence[str]]


def _openclip_templates(name: str) -> list[str]:
    from open_clip import zero_shot_metadata as zsm
    lists = {"openai": zsm.OPENAI_IMAGENET_TEMPLATES, "simple": zsm.SIMPLE_IMAGENET_TEMPLATES}
    # open_clip ships callables (lambda c: f"a photo of a {c}."); turn them into "{}" strings.
    return [t("{}") if callable(t) else str(t) for t in lists[name]]


def resolve_templates(templates: Templates = "simple") -> list[str]:
    """``simple`` (7) / ``openai`` (80) from open_clip, a file (one template per line),
    a single template string containing ``{}``, or a list of such strings."""
    if isinstance(templates, (str, os.PathLike)):
        t = str(templates)
        if t in ("simple", "openai"):
            out = _openclip_templates(t)
        elif "{}" in t:
            out = [t]
        elif Path(t).is_file():
            lines = read_text_file(t, "templates file").splitlines()
            out = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not out:
                raise InputError(f"templates file {t} has no templates")
        else:
            raise InputError(f"templates {t!r}: not 'simple', 'openai', a file, or a string with {{}}")
    else:
        out = [str(x) for x in templates]
    if not out:
        raise InputError("empty template list")
    bad = [x for x in out if "{}" not in x]
    if bad:
        raise InputError(f"template {bad[0]!r} has no '{{}}' placeholder for the label")
    return out


def parse_labels(labels: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(labels, str):
        labels = labels.split(",")
    out = [x.strip() for x in labels if x.strip()]
    if len(out) < 1:
        raise InputError("no labels given (e.g. --labels 'cat,dog')")
    dupes = {x for x in out if out.count(x) > 1}
    if dupes:
        raise InputError(f"duplicate labels: {', '.join(sorted(dupes))}")
    return out


def build_classifier(scorer, labels: Sequence[str], templates: Templates = "simple") -> torch.Tensor:
    """Ensembled label embeddings [L, D], unit norm, fp32."""
    tmpl = resolve_templates(templates)
    texts = [t.format(label) for label in labels for t in tmpl]
    emb = scorer.encode_texts(texts).view(len(labels), len(tmpl), -1)    # [L, T, D]
    return F.normalize(emb.mean(dim=1), dim=-1)


@dataclass
class Classification:
    labels: list[str]
    probs: torch.Tensor            # [N, L] softmax(logit_scale * cos) over labels
    similarity: torch.Tensor       # [N, L] cosine with each ensembled label embedding
    templates: list[str] = field(default_factory=list)
    model: str | None = None       # the scorer's spec
    sources: list[str] = field(default_factory=list)   # [N] image paths, when the images came from files

    @property
    def top(self) -> list[str]:
        return [self.labels[i] for i in self.probs.argmax(dim=1).tolist()]

    def to_dict(self) -> dict:
        """``{model, labels, templates (count), results: [{path, label, probs: {label: p}}]}`` (``path``
        is None for images that did not come from files)."""
        probs = self.probs.detach().cpu()
        paths = self.sources or [None] * len(probs)
        return {"model": self.model, "labels": self.labels, "templates": len(self.templates),
                "results": [{"path": p, "label": self.labels[int(probs[i].argmax())],
                             "probs": dict(zip(self.labels, probs[i].tolist()))}
                            for i, p in enumerate(paths)]}


def classify(images, labels, templates: Templates = "simple", scorer=None) -> Classification:
    """Zero-shot classification with prompt ensembling.

    Args:
        images: PIL images, paths or a float tensor [B,3,H,W] in [0,1].
        labels: list of class names, or one comma-separated string.
        templates: ``simple``, ``openai``, a file path, a ``{}`` template, or a list of templates.
        scorer: a :class:`~clipkit.core.scorer.ClipScorer` (default: the bundled ``shapes`` model).
    """
    if scorer is None:
        scorer = load_scorer("shapes")
    labels = parse_labels(labels)
    tmpl = resolve_templates(templates)
    cls = build_classifier(scorer, labels, tmpl)
    img = scorer.encode_images(images)
    sim = img @ cls.T                                                    # [N, L]
    sources = [] if isinstance(images, torch.Tensor) else _sources(images)
    return Classification(labels, (scorer.logit_scale * sim).softmax(dim=-1), sim, tmpl,
                          model=scorer.spec, sources=sources)


def _sources(images) -> list[str]:
    """[N] paths of the images given as paths (None for the others); [] when none was a path."""
    items = [images] if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence) else images
    out = [str(x) if isinstance(x, (str, os.PathLike)) else None for x in items]
    return out if any(out) else []
