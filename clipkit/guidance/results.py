"""What `generate` returns and writes: images with their scores, file names, sidecars (on
:mod:`clipkit.core.outputs`' safe writer: checked first, atomic, never through a link, never an input)."""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from clipkit.core.errors import InputError
from clipkit.core.outputs import check_not_input, check_output_dir, write_bytes_atomic
from clipkit.guidance.config import GenerateConfig
from clipkit.guidance.prompting import prompt_layout, prompt_parts

SCORE_NOTE = ("cosine similarity between the image as saved and its prompt, under the guiding CLIP; "
              "guidance optimises this number, so it overstates quality: judge with another CLIP or the oracle")


WEIGHTED_NOTE = ("weighted cosine similarity between the image as saved and the prompt's positive parts and image "
                 "prompts, under the guiding CLIP(s) (an ensemble: weighted by --clip-weights), plus each "
                 "--scorer's score times its weight, less each "
                 "negative's hinge w * softplus(s (cos_neg - cos)) / s (w: its strength, s: CLIP's logit "
                 "scale); with layout grid, the mean of that over the prompt's objects, each scored on the "
                 "image with the other objects' grid cells erased; guidance optimises this number, so it "
                 "overstates quality: judge with another CLIP or the oracle")


SCORE_NOTES = {"cosine": SCORE_NOTE, "weighted": WEIGHTED_NOTE}     # by score_kind


@dataclass
class GeneratedImage:
    prompt: str
    seed: int
    image: Image.Image
    clip_score: float               # the score best-of ranks by (``score``): cosine(image as saved, prompt)
                                    # under the guiding CLIP, or the weighted score of WEIGHTED_NOTE
    rank: int                       # 1 = best of this prompt's candidates
    path: str | None = None         # the PNG, when written
    sidecar: str | None = None      # its JSON sidecar
    selection_score: float | None = None    # the Selector's score, when one chose among candidates
    score: str = "cosine"           # what clip_score is: "cosine" | "weighted" (:func:`score_kind`)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k != "image" and not (k == "selection_score" and v is None)}


@dataclass
class GenerateResult:
    images: list[GeneratedImage]    # per prompt (in the order given), best first
    config: GenerateConfig
    models: dict                    # {"clip": spec, "diffusion": spec, "diffusion_kind": ...}
    n: int
    seed: int                       # first seed; candidate k of every prompt has seed + k
    candidates: int                 # candidates per prompt (n * best_of)
    wall_s: float = 0.0
    out_dir: str | None = None

    @property
    def score(self) -> str:
        """"cosine" when every image's score is its prompt's plain cosine, else "weighted" (each image
        says which it is)."""
        return "weighted" if any(im.score == "weighted" for im in self.images) else "cosine"

    @property
    def score_note(self) -> str:
        return SCORE_NOTES[self.score]

    def score_label(self) -> str:
        """What the score column means, in words."""
        clips = self.models["clip"] if isinstance(self.models["clip"], list) else [self.models["clip"]]
        under = f"CLIP {clips[0]!r}" if len(clips) == 1 else "CLIPs " + ", ".join(map(repr, clips)) + " (weighted)"
        parts = [prompt_parts(im.prompt, self.config) for im in self.images]
        weighted = self.config.image_prompts or any(len([p for p in ps if p.weight > 0]) > 1 for ps in parts)
        label = ("weighted cosine with the prompt's parts and image prompts" if weighted else "cosine with the prompt")
        if any(prompt_layout(im.prompt, self.config) for im in self.images):
            label = ("mean over the prompt's objects of the cosine with each object's text, the other objects' "
                     "grid cells erased (--layout grid)")
        if self.config.scorers:
            label += ", plus " + " + ".join(f"{w:g} x {spec}" for spec, w in self.config.scorers)
        if any(p.weight < 0 for ps in parts for p in ps):
            label += ", less the negatives' hinge" + (f" ({'; '.join(self.config.negative)})"
                                                      if self.config.negative else "") + ","
        return f"{label} under {under}"

    def to_dict(self) -> dict:
        return {"score": self.score, "score_note": self.score_note, "models": self.models,
                "parameters": parameters(self.config, self.n, self.seed), "candidates": self.candidates,
                "out_dir": self.out_dir, "wall_s": round(self.wall_s, 3),
                "images": [im.to_dict() for im in self.images]}


def parameters(config: GenerateConfig, n: int, seed: int) -> dict:
    """What a sidecar records of a run (``strength`` only with an init image: it means nothing without)."""
    d = {"n": n, "seed": seed, **config.to_dict(), "guidance": config.guidance().to_dict()}
    if config.init_image is None:
        d.pop("strength")
    return d


def slugify(prompt: str, max_len: int = 60) -> str:
    """File-name stem of a prompt: lowercase ASCII words joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "prompt"


def _taken(png: Path) -> bool:
    """A name is taken when its PNG or its sidecar exists (a dangling symlink counts: never written through)."""
    return os.path.lexists(png) or os.path.lexists(png.with_suffix(".json"))


def plan_targets(prompts: Sequence[str], seeds: Sequence[int], out_dir: Path,
                 overwrite: bool = False) -> dict[tuple[int, int], Path]:
    """(prompt index, seed) -> PNG path, for every candidate that could be kept.

    The name of an image is ``<slug>-<seed>.png``. When an earlier run left that name (its PNG or its
    sidecar), the next free ``<slug>-<seed>-2.png``, ``-3``, ... is used, so nothing is replaced and a
    sequence of runs never fails on a name; ``overwrite`` replaces ``<slug>-<seed>.png`` instead.
    """
    owner: dict[str, str] = {}
    for p in prompts:
        slug = slugify(p)
        if slug in owner:
            raise InputError(f"prompts {owner[slug]!r} and {p!r} give the same file name stem {slug!r}: "
                             "generate them in separate runs (with other seeds or --out)")
        owner[slug] = p
    targets = {}
    for i, p in enumerate(prompts):
        for s in seeds:
            png, k = out_dir / f"{slugify(p)}-{s}.png", 1
            while not overwrite and _taken(png):
                k += 1
                png = out_dir / f"{slugify(p)}-{s}-{k}.png"
            targets[(i, s)] = png
    return targets


def check_out_dir(out_dir: Path, targets: Sequence[Path], inputs: Sequence = ()) -> None:
    """Before any work, creating nothing: the folder can be written (or made), and no target is one of
    the ``inputs`` (an init image or image prompt: refused always, even with ``--overwrite``:
    :func:`clipkit.core.outputs.check_not_input`). :func:`write_image` makes the folder."""
    for t in targets:
        for p in (t, t.with_suffix(".json")):
            check_not_input(p, inputs)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"output directory {out_dir} exists and is not a directory")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise InputError(f"output directory {out_dir} is not writable")
        return
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create output directory {out_dir}: {parent} is not a writable directory")


def write_image(img: GeneratedImage, png: Path, sidecar: dict, overwrite: bool) -> None:
    """PNG (with the sidecar in a ``clipkit`` text chunk) + ``.json`` beside it."""
    doc = json.dumps(sidecar, indent=2, ensure_ascii=False)
    info = PngInfo()
    info.add_itxt("clipkit", doc)
    buf = io.BytesIO()
    img.image.save(buf, format="PNG", pnginfo=info)
    check_output_dir(png.parent)
    try:
        write_bytes_atomic(png, buf.getvalue(), overwrite=overwrite)
        write_bytes_atomic(png.with_suffix(".json"), (doc + "\n").encode("utf-8"), overwrite=overwrite)
    except OSError as e:
        raise InputError(f"cannot write {png}: {e.strerror or e}") from None
    img.path, img.sidecar = str(png), str(png.with_suffix(".json"))
