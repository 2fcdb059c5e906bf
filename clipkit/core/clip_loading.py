"""Loading CLIPs: open_clip models and transformers ``CLIPModel``s with the preprocessing their own
library applies (FIELD_NOTES A, E). The spec sources of :mod:`clipkit.core.registry` call these with a
bound spec (``.raw``, ``.resolve()``); nothing here parses specs.

Imports inside functions here are deliberate: the registry imports this module, and the registry must
load without torch, open_clip or transformers (spec checks at option parsing, `clipkit models`)."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from clipkit.core import hub
from clipkit.core.errors import ModelLoadError

# Imported where used: open_clip, transformers (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

if TYPE_CHECKING:
    from clipkit.core.registry import ModelSpec, Resolved

def openclip_preprocess(model, spec: str = "open_clip model"):
    """open_clip's inference transform (``image_transform``) as a PreprocessConfig: PIL resize of the
    shortest side (or squash), torchvision CenterCrop rounding; ModelLoadError for what we cannot match."""
    import open_clip

    from clipkit.core.preprocess import PreprocessConfig
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or int(size[0]) != int(size[1]):
            raise ModelLoadError(spec, f"non-square open_clip image size {tuple(size)} is not supported",
                                 "use a square image_size")
        size = int(size[0])
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation == "random":       # open_clip's inference transform uses bicubic for 'random'
        interpolation = "bicubic"
    try:
        return PreprocessConfig.from_dict({
            "image_size": size, "mean": cfg.get("mean"), "std": cfg.get("std"),
            "interpolation": interpolation, "resize_mode": cfg.get("resize_mode") or "shortest"})
    except ValueError as e:
        raise ModelLoadError(spec, f"open_clip preprocess_cfg: {hub.one_line(e)}",
                             "use resize_mode 'shortest' or 'squash' and bicubic/bilinear interpolation") from e


def create_openclip(s: "ModelSpec", name: str, pretrained: str | None, kwargs: dict, fix: str):
    import open_clip

    from clipkit.core.backends import OpenClipBackend
    hub.short_timeouts()
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # download/cache/format failures all end here
        raise ModelLoadError(s.raw, hub.one_line(e), fix) from e
    return OpenClipBackend(model, tokenizer, openclip_preprocess(model, s.raw), s.raw)


#: where transformers keeps a CLIPProcessor's image settings, in the order it reads them:
#: ``processor_config.json`` (transformers 5 ``CLIPProcessor.save_pretrained``; settings nested under
#: ``image_processor``), then ``preprocessor_config.json`` (``CLIPImageProcessor.save_pretrained``, older saves)
HF_PROCESSOR_FILES = (("processor_config.json", "image_processor"), ("preprocessor_config.json", None))


def hf_processor_dict(r: "Resolved") -> tuple[dict, str] | None:
    """The image processor settings transformers would use for this directory or hub repo, and the
    file they came from; None when there are none."""
    for name, key in HF_PROCESSOR_FILES:
        try:
            f = r.file(name)
        except Exception:
            continue
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is not valid JSON ({hub.one_line(e)})") from e
        if key is not None:
            d = d.get(key) if isinstance(d, dict) else None
            if d is None:
                continue        # a processor_config.json without image settings: transformers reads on
        if not isinstance(d, dict):
            raise ValueError(f"{name}: image processor settings are not a JSON object")
        return d, name
    return None


def hf_resize_backend() -> str:
    """transformers 5 loads the torchvision-backed CLIPImageProcessor by default. Older versions
    defaulted to the PIL/numpy processor; only transformers 5 is conformance-tested."""
    import transformers
    return "torchvision" if int(transformers.__version__.split(".")[0]) >= 5 else "pil"


def hf_preprocess(r: "Resolved", model):
    """The preprocessing ``CLIPProcessor.from_pretrained`` would apply, exactly; ModelLoadError for
    settings we cannot reproduce or that do not fit the model."""

    from clipkit.core.preprocess import from_hf_image_processor
    size = int(model.config.vision_config.image_size)
    fix = "use a CLIPImageProcessor with shortest_edge or height/width resizing and a centre crop of the model's size"
    try:
        found = hf_processor_dict(r)
        if found is None:
            logging.getLogger(__name__).warning(
                "%s: no processor_config.json or preprocessor_config.json; using CLIPImageProcessor's defaults "
                "(bicubic, OpenAI mean/std) at the model's %d px", r.raw, size)
            d, source = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}, "defaults"
        else:
            d, source = found
        cfg = from_hf_image_processor(d, resize_backend=hf_resize_backend())
    except ValueError as e:
        raise ModelLoadError(r.raw, hub.one_line(e), fix) from e
    if cfg.output_hw != (size, size):
        h, w = cfg.output_hw
        raise ModelLoadError(r.raw, f"{source} gives {h}x{w} pixels but the vision model takes {size}x{size}", fix)
    return cfg


def load_hf_clip(s: "ModelSpec"):
    """A transformers ``CLIPModel`` + tokenizer from a directory or a hub repo."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    from clipkit.core.backends import HFClipBackend
    hf_logging.disable_progress_bar()
    hub.short_timeouts()
    r = s.resolve()
    try:
        model = CLIPModel.from_pretrained(r.location, local_files_only=r.local_only)
        tokenizer = AutoTokenizer.from_pretrained(r.location, local_files_only=r.local_only)
    except Exception as e:
        raise ModelLoadError(s.raw, hub.one_line(e),
                             r.fix("the directory must hold a transformers CLIPModel and its tokenizer")) from e
    return HFClipBackend(model, tokenizer, hf_preprocess(r, model), s.raw)
