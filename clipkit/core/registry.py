"""Model specs, resolved in one place (DESIGN §2).

Syntax, everywhere (``--clip``, ``--diffusion``, ``--captioner``, Python):

* ``shapes``                    the bundled, offline Shapes models (package data)
* ``openclip:ARCH/TAG``         open_clip architecture + pretrained tag, e.g. ``openclip:ViT-B-32/laion2b_s34b_b79k``
* ``hf:ORG/NAME``               a Hugging Face hub repository (transformers CLIP, diffusers pipeline, ...)
* ``/a/local/dir``              a local directory: ``config.json`` (transformers) or
                                ``open_clip_config.json`` + weights (open_clip)

Every failure raises :class:`ModelLoadError` with one line naming the spec and the fix. We never
hang on the network: hub calls get short timeouts, and ``HF_HUB_OFFLINE=1`` is respected.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from clipkit.core.errors import ModelLoadError

BUNDLED = "shapes"
#: bundled model names: ``shapes`` (every component) and ``shapes-noised`` (the noise-aware guide
#: CLIP: an overlay of the bundled CLIP whose early image layers were fine-tuned on DDPM-noised x_t)
BUNDLED_NAMES = (BUNDLED, "shapes-noised")
OFFLINE_FIX = "check the network, or download it once and set HF_HUB_OFFLINE=1 to use the cache"


@dataclass(frozen=True)
class Profile:
    """The model choices that go together."""
    name: str
    clip: str
    diffusion: str | None
    captioner: str | None
    description: str
    guide: str | None = None     # the CLIP that steers `generate` (None: ``clip``)


PROFILES: dict[str, Profile] = {
    "shapes": Profile("shapes", "shapes", "shapes", "shapes",
                      "bundled, offline demo models; they know only the Shapes world",
                      guide="shapes-noised"),
    "sd": Profile("sd", "openclip:ViT-B-32/laion2b_s34b_b79k",
                  "hf:stable-diffusion-v1-5/stable-diffusion-v1-5", None,
                  "real models from the hub (needs a network once, or a cache); "
                  "point --captioner at a ClipCap checkpoint"),
}
DEFAULT_PROFILE = "shapes"


@dataclass(frozen=True)
class ModelSpec:
    raw: str
    kind: str        # "bundled" | "openclip" | "hf" | "local-openclip" | "local-hf"
    target: str      # bundled name, "ARCH/TAG", "ORG/NAME" or a directory path
    extra: dict = field(default_factory=dict, compare=False)


def assets_dir() -> Path:
    return Path(str(resources.files("clipkit") / "assets"))


def bundled_path(name: str, component: str) -> Path:
    """Directory of a bundled model, e.g. ``bundled_path("shapes", "clip")``."""
    return assets_dir() / f"{name}_{component}"


def parse_spec(spec: str, component: str = "clip") -> ModelSpec:
    """Parse a model spec string; raises ModelLoadError for malformed or unknown ones."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(str(spec), "empty model spec", "use 'shapes', 'openclip:ARCH/TAG', "
                             "'hf:ORG/NAME' or a local directory")
    spec = spec.strip()
    if spec in BUNDLED_NAMES:
        return ModelSpec(spec, "bundled", spec)
    if spec.startswith("openclip:"):
        body = spec[len("openclip:"):]
        arch, _, tag = body.partition("/")
        if not arch or not tag:
            raise ModelLoadError(spec, "expected openclip:ARCH/TAG",
                                 "e.g. openclip:ViT-B-32/laion2b_s34b_b79k; `clipkit models` lists some")
        return ModelSpec(spec, "openclip", body, {"arch": arch, "tag": tag})
    if spec.startswith("hf:"):
        repo = spec[3:]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelLoadError(spec, "expected hf:ORG/NAME", "e.g. hf:openai/clip-vit-base-patch32")
        return ModelSpec(spec, "hf", repo)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return ModelSpec(spec, "local-openclip", str(path))
        if (path / "config.json").is_file() or (path / "model_index.json").is_file():
            return ModelSpec(spec, "local-hf", str(path))
        raise ModelLoadError(spec, "directory has no config.json, model_index.json or open_clip_config.json",
                             "point at a saved transformers/diffusers/open_clip model directory")
    if path.exists():
        return ModelSpec(spec, "file", str(path))
    if "/" in spec or os.sep in spec or spec.startswith("."):
        raise ModelLoadError(spec, "no such directory", "check the path")
    raise ModelLoadError(spec, "unknown model spec",
                         "use 'shapes', 'openclip:ARCH/TAG', 'hf:ORG/NAME' or a local directory; "
                         "`clipkit models` lists them")


def clip_training_info(spec: str) -> dict:
    """The training config saved inside a clipkit-trained CLIP (bundled or a local open_clip
    directory); {} for anything else (hub models, other formats)."""
    try:
        s = parse_spec(spec)
    except ModelLoadError:
        return {}
    path = bundled_path(s.target, "clip") if s.kind == "bundled" else Path(s.target)
    if s.kind not in ("bundled", "local-openclip"):
        return {}
    try:
        info = json.loads((path / "open_clip_config.json").read_text()).get("clipkit", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return info.get("training", {}) if isinstance(info, dict) else {}


def is_noise_aware(spec: str) -> bool:
    """Whether a CLIP was trained on noised images x_t (``clipkit train clip --noise-aware``)."""
    return bool(clip_training_info(spec).get("noise_aware"))


def _short_timeouts() -> None:
    # huggingface_hub reads these at call time; short values mean "fail fast, never hang".
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")


_short_timeouts()   # before huggingface_hub is imported: it reads these once


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """A TCP connect to the hub endpoint with a short timeout (huggingface_hub itself retries with
    back-off for ~30-60 s before giving up on an unreachable network)."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{host} unreachable ({e.strerror or type(e).__name__})"


def _require_cached_or_online(spec: "ModelSpec") -> None:
    """Fail in seconds, with the fix, when a hub model is neither cached nor downloadable."""
    if is_available(spec.raw)[0]:
        return
    if _offline():
        raise ModelLoadError(spec.raw, "not in the local cache and HF_HUB_OFFLINE is set",
                             "download it once with a network, or unset HF_HUB_OFFLINE")
    ok, why = hub_reachable()
    if not ok:
        raise ModelLoadError(spec.raw, f"not in the local cache and the hub is {why.split(' ', 1)[1]}"
                             if " " in why else why, OFFLINE_FIX)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) < 200 else msg[:197] + "..."


# --------------------------------------------------------------------------------------------
# CLIP loading
# --------------------------------------------------------------------------------------------

def _openclip_preprocess(model, spec: str = "open_clip model"):
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
        raise ModelLoadError(spec, f"open_clip preprocess_cfg: {_one_line(e)}",
                             "use resize_mode 'shortest' or 'squash' and bicubic/bilinear interpolation") from e


def _load_openclip(spec: ModelSpec):
    import open_clip

    from clipkit.core.backends import OpenClipBackend
    if spec.kind == "openclip":
        arch, tag = spec.extra["arch"], spec.extra["tag"]
        if arch not in open_clip.list_models():
            raise ModelLoadError(spec.raw, f"unknown open_clip architecture {arch!r}",
                                 "see open_clip.list_models(), e.g. ViT-B-32, ViT-B-32-quickgelu")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags and not Path(tag).is_file():
            raise ModelLoadError(spec.raw, f"unknown pretrained tag {tag!r} for {arch}",
                                 f"choose one of: {', '.join(tags) or '(none)'}")
        if not Path(tag).is_file():
            _require_cached_or_online(spec)
        name, pretrained = arch, tag
        if tag == "openai" and "quickgelu" not in arch.lower():
            # OpenAI weights were trained with QuickGELU; open_clip >= 2.29 no longer switches it on
            # for ('ViT-B-32', 'openai') and silently loses accuracy (FIELD_NOTES A).
            kwargs = {"force_quick_gelu": True}
        else:
            kwargs = {}
    else:
        from clipkit.core.artifacts import overlay_base
        base = overlay_base(spec.target)
        if base is not None:
            return _load_overlay(spec, base)
        # open_clip only *warns* when a local dir has no weights and returns a random model: refuse.
        if not any(any(Path(spec.target).glob(g)) for g in ("*.safetensors", "*.bin", "*.pth")):
            raise ModelLoadError(spec.raw, "no weights file (*.safetensors, *.bin, *.pth) in the directory",
                                 "save the weights beside open_clip_config.json")
        name, pretrained, kwargs = f"local-dir:{spec.target}", None, {}
    _short_timeouts()
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # download/cache/format failures all end here
        fix = OFFLINE_FIX if spec.kind == "openclip" else "check the directory's config and weights"
        raise ModelLoadError(spec.raw, _one_line(e), fix) from e
    return OpenClipBackend(model, tokenizer, _openclip_preprocess(model, spec.raw), spec.raw)


#: where transformers keeps a CLIPProcessor's image settings, in the order it reads them:
#: ``processor_config.json`` (transformers 5 ``CLIPProcessor.save_pretrained``; settings nested under
#: ``image_processor``), then ``preprocessor_config.json`` (``CLIPImageProcessor.save_pretrained``, older saves)
HF_PROCESSOR_FILES = (("processor_config.json", "image_processor"), ("preprocessor_config.json", None))


def _hf_processor_dict(path_or_repo: str, local_only: bool) -> tuple[dict, str] | None:
    """The image processor settings transformers would use for this directory or hub repo, and the
    file they came from; None when there are none."""
    p = Path(path_or_repo)
    for name, key in HF_PROCESSOR_FILES:
        if p.is_dir():
            f = p / name
        else:
            try:
                from huggingface_hub import hf_hub_download
                f = Path(hf_hub_download(path_or_repo, name, local_files_only=local_only))
            except Exception:
                continue
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is not valid JSON ({_one_line(e)})") from e
        if key is not None:
            d = d.get(key) if isinstance(d, dict) else None
            if d is None:
                continue        # a processor_config.json without image settings: transformers reads on
        if not isinstance(d, dict):
            raise ValueError(f"{name}: image processor settings are not a JSON object")
        return d, name
    return None


def _hf_resize_backend() -> str:
    """transformers 5 loads the torchvision-backed CLIPImageProcessor by default. Older versions
    defaulted to the PIL/numpy processor; only transformers 5 is conformance-tested."""
    import transformers
    return "torchvision" if int(transformers.__version__.split(".")[0]) >= 5 else "pil"


def _hf_preprocess(spec: ModelSpec, model, local_only: bool):
    """The preprocessing ``CLIPProcessor.from_pretrained`` would apply, exactly; ModelLoadError for
    settings we cannot reproduce or that do not fit the model."""
    import logging

    from clipkit.core.preprocess import from_hf_image_processor
    size = int(model.config.vision_config.image_size)
    fix = "use a CLIPImageProcessor with shortest_edge or height/width resizing and a centre crop of the model's size"
    try:
        found = _hf_processor_dict(spec.target, local_only)
        if found is None:
            logging.getLogger(__name__).warning(
                "%s: no processor_config.json or preprocessor_config.json; using CLIPImageProcessor's defaults "
                "(bicubic, OpenAI mean/std) at the model's %d px", spec.raw, size)
            d, source = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}, "defaults"
        else:
            d, source = found
        cfg = from_hf_image_processor(d, resize_backend=_hf_resize_backend())
    except ValueError as e:
        raise ModelLoadError(spec.raw, _one_line(e), fix) from e
    if cfg.output_hw != (size, size):
        h, w = cfg.output_hw
        raise ModelLoadError(spec.raw, f"{source} gives {h}x{w} pixels but the vision model takes {size}x{size}", fix)
    return cfg


def _load_hf_clip(spec: ModelSpec):
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    from clipkit.core.backends import HFClipBackend
    hf_logging.disable_progress_bar()
    _short_timeouts()
    local_only = spec.kind == "local-hf" or _offline()
    if spec.kind == "hf":
        _require_cached_or_online(spec)
        local_only = local_only or is_available(spec.raw)[0]
    try:
        model = CLIPModel.from_pretrained(spec.target, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(spec.target, local_files_only=local_only)
    except Exception as e:
        fix = OFFLINE_FIX if spec.kind == "hf" else "the directory must hold a transformers CLIPModel and its tokenizer"
        raise ModelLoadError(spec.raw, _one_line(e), fix) from e
    return HFClipBackend(model, tokenizer, _hf_preprocess(spec, model, local_only), spec.raw)


def _load_overlay(spec: ModelSpec, base: str):
    """A partial fine-tune: load its base CLIP, then replace the weights the overlay holds."""
    from clipkit.core.artifacts import apply_overlay
    if base in (spec.raw, spec.target):
        raise ModelLoadError(spec.raw, "overlay names itself as its base", "check open_clip_config.json")
    backend = load_clip(base)
    try:
        apply_overlay(backend.module, spec.target)
    except (OSError, ValueError) as e:
        raise ModelLoadError(spec.raw, _one_line(e), f"the overlay must come from fine-tuning {base!r}") from e
    backend.spec = spec.raw
    return backend


def load_clip(spec: str | ModelSpec = BUNDLED):
    """Resolve and load a CLIP model -> a :class:`~clipkit.core.backends.ClipBackend` (CPU, fp32)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "bundled":
        path = bundled_path(spec.target, "clip")
        if not (path / "open_clip_config.json").is_file():
            raise ModelLoadError(spec.raw, f"bundled weights missing from {path}",
                                 "reinstall clipkit, or train them with `clipkit train clip`")
        backend = _load_openclip(ModelSpec(str(path), "local-openclip", str(path)))
        backend.spec = spec.raw
        return backend
    if spec.kind in ("openclip", "local-openclip"):
        return _load_openclip(spec)
    if spec.kind in ("hf", "local-hf"):
        return _load_hf_clip(spec)
    raise ModelLoadError(spec.raw, "a single file is not a CLIP model spec",
                         "use a directory, 'openclip:ARCH/TAG' or 'hf:ORG/NAME'")


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    spec: str
    component: str      # clip | guide (the CLIP that steers generate) | diffusion | captioner
    profile: str | None
    available: bool     # loadable right now without a network
    note: str = ""


def _hub_cached(repo: str, filenames: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for f in filenames:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return True
    return False


def is_available(spec: str, component: str = "clip") -> tuple[bool, str]:
    """Whether ``spec`` can be loaded offline right now, and a short note why (not)."""
    try:
        s = parse_spec(spec, component)
    except ModelLoadError as e:
        return False, e.reason
    if s.kind == "bundled":
        ok = bundled_path(s.target, component).is_dir()
        return ok, "bundled" if ok else "not bundled in this installation"
    if s.kind in ("local-openclip", "local-hf", "file"):
        return True, "local"
    if s.kind == "hf":
        ok = _hub_cached(s.target, ("config.json", "model_index.json"))
        return ok, "in the hub cache" if ok else "not cached (needs a download)"
    try:
        import open_clip
        cfg = open_clip.get_pretrained_cfg(s.extra["arch"], s.extra["tag"])
    except Exception:
        cfg = {}
    repo = (cfg or {}).get("hf_hub", "").rstrip("/")
    ok = bool(repo) and _hub_cached(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    return ok, "in the hub cache" if ok else "not cached (needs a download)"


def list_models() -> list[ModelEntry]:
    """Every profile's models, with whether each is available offline."""
    out = []
    for prof in PROFILES.values():
        for comp in ("clip", "guide", "diffusion", "captioner"):
            spec = getattr(prof, comp)
            if comp == "guide":
                if spec is None:
                    continue
                ok, note = is_available(spec, "clip")
                out.append(ModelEntry(spec, comp, prof.name, ok, note + "; guides `generate`"))
                continue
            if spec is None:
                out.append(ModelEntry("-", comp, prof.name, False, "user supplies --" + comp))
                continue
            ok, note = is_available(spec, comp)
            out.append(ModelEntry(spec, comp, prof.name, ok, note))
    return out
