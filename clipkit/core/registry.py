"""Model specs, resolved in one place for every model kind (DESIGN §2).

Syntax, everywhere (``--clip``, ``--diffusion``, ``--captioner``, Python):

* ``shapes``                    the bundled, offline Shapes models (package data)
* ``openclip:ARCH/TAG``         open_clip architecture + pretrained tag, e.g. ``openclip:ViT-B-32/laion2b_s34b_b79k``
* ``hf:ORG/NAME``               a Hugging Face hub repository (transformers CLIP, diffusers pipeline, GPT-2, ...)
* ``/a/local/dir``              a local directory: ``open_clip_config.json`` + weights (open_clip; an *overlay*
                                when it names a base CLIP), ``config.json`` (transformers), ``model_index.json``
                                (diffusers) or ``clipcap_config.json`` (a clipkit captioner)
* ``/a/file.pt``                an official ClipCap checkpoint (captioner)

Each way of writing a spec is a :class:`Source` (one row of :data:`SOURCES`); :func:`parse_spec` binds a
spec string to the first source that takes it, for one model *kind* (``clip``, ``diffusion``,
``captioner``, ``decoder``: the GPT-2 a captioner is trained on). Core loads CLIPs itself
(:func:`load_clip`); the plugins, which build their own models (diffusers pipelines, ClipCap), ask
:func:`resolve` where the model is (a local path or a hub repo id, and whether to stay offline),
with the hub checks done.

Every failure raises :class:`ModelLoadError` with one line naming the spec and the fix. We never
hang on the network: hub calls get short timeouts, and ``HF_HUB_OFFLINE=1`` is respected
(:mod:`clipkit.core.hub`). It loads without torch: open_clip, huggingface_hub and ``apply_overlay`` are imported where used.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, ClassVar

from clipkit.core import hub
from clipkit.core.clip_loading import create_openclip, load_hf_clip
from clipkit.core.errors import ModelLoadError

BUNDLED = "shapes"
#: bundled model names: ``shapes`` (every component) and ``shapes-noised`` (the noise-aware guide
#: CLIP: an overlay of the bundled CLIP whose image tower was fine-tuned on DDPM-noised x_t)
BUNDLED_NAMES = (BUNDLED, "shapes-noised")




# --------------------------------------------------------------------------------------------
# Model kinds
# --------------------------------------------------------------------------------------------

#: the fix for a spec that names nothing
SPEC_USAGE = "use 'shapes', 'openclip:ARCH/TAG', 'hf:ORG/NAME' or a local directory"
#: the file that marks a clipkit captioner directory (``clipkit.captioning.checkpoint.CONFIG_NAME``)
CLIPCAP_CONFIG = "clipcap_config.json"


@dataclass(frozen=True)
class Kind:
    """A model kind (the ``component`` argument of :func:`parse_spec`): what its errors say."""
    name: str                        # clip | diffusion | captioner | decoder
    label: str                       # "... is not a {label} model spec"
    usage: str                       # the fix naming the specs of this kind
    marker: str | None = None        # the file a bundled model directory of this kind holds
    missing: str = "bundled weights missing"
    bundled_fix: str = "reinstall clipkit"
    empty: str = "empty model spec"
    empty_fix: str = SPEC_USAGE
    not_found: str | None = None     # one reason for every spec of no source of this kind (captioner)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("clip", "CLIP", "use a directory, 'openclip:ARCH/TAG' or 'hf:ORG/NAME'", "open_clip_config.json",
         bundled_fix="reinstall clipkit, or train them with `clipkit train clip`"),
    Kind("diffusion", "diffusion", "use 'shapes', 'hf:ORG/NAME' or a diffusers pipeline directory", "model_index.json",
         bundled_fix="reinstall clipkit, or train them with `clipkit train diffusion`"),
    Kind("captioner", "captioner", "use 'shapes', a directory written by `clipkit train captioner`, "
         "or an official ClipCap .pt", CLIPCAP_CONFIG, missing="bundled captioner missing",
         bundled_fix="reinstall clipkit, or train it with `clipkit train captioner --data shapes`",
         empty="empty captioner spec", empty_fix="use 'shapes', a directory or a ClipCap .pt",
         not_found="no such captioner directory or .pt file"),
    Kind("decoder", "GPT-2", "use a local GPT-2 directory, 'hf:ORG/NAME' or a hub name such as gpt2"),
    Kind("scorer", "scorer", "use 'aesthetic:PATH' (a LAION aesthetic-predictor head)"),
)}
#: profile components -> the kind their spec is
COMPONENT_KINDS = {"clip": "clip", "guide": "clip", "diffusion": "diffusion", "captioner": "captioner",
                   "decoder": "decoder", "scorer": "scorer"}


def _kind(component: str) -> Kind:
    try:
        return KINDS[COMPONENT_KINDS[component]]
    except KeyError:
        raise ValueError(f"unknown model kind {component!r}; one of: {', '.join(COMPONENT_KINDS)}") from None


# --------------------------------------------------------------------------------------------
# Specs, sources, resolved locations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A spec string bound to its :class:`Source`, for one model kind."""
    raw: str
    source: "Source"
    target: str      # bundled name, "ARCH/TAG", "ORG/NAME" or a local path
    extra: dict = field(default_factory=dict, compare=False)
    component: str = "clip"

    @property
    def kind(self) -> str:
        """The source's name: bundled | openclip | hf | local-openclip | overlay | local-hf | local-diffusers |
        clipcap-dir | file."""
        return self.source.kind

    def available(self) -> tuple[bool, str]:
        """Whether it can be loaded offline right now, and a short note why (not)."""
        return self.source.is_available(self)

    def resolve(self) -> "Resolved":
        return self.source.resolve(self)

    def load_clip(self):
        return self.source.load_clip(self)

    def training_info(self) -> dict:
        return self.source.training_info(self)

    def model_cfg(self) -> dict:
        return self.source.model_cfg(self)


@dataclass(frozen=True)
class Resolved:
    """Where a model is, as a loader takes it (``from_pretrained(location, local_files_only=local_only)``);
    the hub checks are done: a hub model is cached or downloadable."""
    spec: ModelSpec
    location: str        # a local directory or file, or a hub repository id
    local_only: bool     # a local path, HF_HUB_OFFLINE, or already in the hub cache
    on_disk: bool        # ``location`` is a local path (False: a hub repository)

    @property
    def raw(self) -> str:
        return self.spec.raw

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def bundled(self) -> bool:
        return self.spec.source.bundled

    def fix(self, local_fix: str) -> str:
        """The fix of a failed load: ``local_fix`` for a local model, the hub's for a hub one."""
        return local_fix if self.on_disk else hub.OFFLINE_FIX

    def file(self, name: str) -> Path:
        """A file of the model (``model_index.json``, ...) on disk: in its directory, or from the hub
        (its cache, or a download when allowed). Errors are huggingface_hub's / FileNotFoundError."""
        if self.on_disk:
            return Path(self.location) / name
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(self.location, name, local_files_only=self.local_only))


def _local(s: ModelSpec) -> Resolved:
    return Resolved(s, s.target, True, True)


def _open_clip_json(directory: Path) -> dict:
    """``open_clip_config.json`` of a directory; {} when missing or unreadable."""
    try:
        d = json.loads((Path(directory) / "open_clip_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _training_info(directory: Path) -> dict:
    info = _open_clip_json(directory).get("clipkit", {})
    return info.get("training", {}) if isinstance(info, dict) else {}


def _dir_model_cfg(spec: str, directory: Path) -> dict:
    cfg = _open_clip_json(directory).get("model_cfg")
    if not isinstance(cfg, dict):
        raise ModelLoadError(spec, f"no model_cfg in {Path(directory) / 'open_clip_config.json'}",
                             "point at an open_clip model directory")
    return cfg


class Source:
    """One way of writing a model spec (a row of :data:`SOURCES`).

    ``parse`` claims a spec string (None: not this source's syntax; ModelLoadError: this source's syntax
    but malformed). The rest act on a parsed :class:`ModelSpec`; a source supports the model kinds in
    ``components`` and refuses the others with a one-line :class:`ModelLoadError`.
    """
    kind: ClassVar[str]
    syntax: ClassVar[str]                  # how its specs are written (for listings)
    noun: ClassVar[str]                    # "... is not a CLIP model spec" starts with it
    components: ClassVar[frozenset[str]]
    bundled: ClassVar[bool] = False

    def parse(self, spec: str, component: str) -> ModelSpec | None:
        raise NotImplementedError

    def resolve(self, s: ModelSpec) -> Resolved:
        """Where the model is, for the plugin that builds it; hub checks done."""
        return _local(s)

    def is_available(self, s: ModelSpec) -> tuple[bool, str]:
        return True, "local"

    def load_clip(self, s: ModelSpec):
        """A :class:`~clipkit.core.backends.ClipBackend` (CPU, fp32)."""
        raise self.wrong_kind(s.raw, "clip")

    def training_info(self, s: ModelSpec) -> dict:
        """The training config saved inside a clipkit-trained CLIP; {} for anything else."""
        return {}

    def model_cfg(self, s: ModelSpec) -> dict:
        """The open_clip model config (architecture) of an open_clip CLIP."""
        raise ModelLoadError(s.raw, "not an open_clip model", "use shapes, openclip:ARCH/TAG or an open_clip directory")

    def wrong_kind(self, spec: str, component: str) -> ModelLoadError:
        kind = _kind(component)
        if kind.not_found:
            return ModelLoadError(spec, kind.not_found, kind.usage)
        return ModelLoadError(spec, f"{self.noun} is not a {kind.label} model spec", kind.usage)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}>"


class BundledSource(Source):
    kind, syntax, noun = "bundled", " | ".join(BUNDLED_NAMES), "a bundled model"
    components = frozenset({"clip", "diffusion", "captioner"})
    bundled = True

    def parse(self, spec, component):
        return ModelSpec(spec, self, spec, component=component) if spec in BUNDLED_NAMES else None

    def resolve(self, s):
        kind, path = _kind(s.component), bundled_path(s.target, s.component)
        if not (path / kind.marker).is_file():
            raise ModelLoadError(s.raw, f"{kind.missing} from {path}", kind.bundled_fix)
        return Resolved(s, str(path), True, True)

    def is_available(self, s):
        ok = bundled_path(s.target, s.component).is_dir()
        return ok, "bundled" if ok else "not bundled in this installation"

    def load_clip(self, s):
        path = self.resolve(s).location
        backend = parse_spec(path).load_clip()      # an open_clip directory, or an overlay of one
        backend.spec = s.raw
        return backend

    def training_info(self, s):
        return _training_info(bundled_path(s.target, s.component))

    def model_cfg(self, s):
        return _dir_model_cfg(s.raw, bundled_path(s.target, s.component))


class OpenClipSource(Source):
    kind, syntax, noun = "openclip", "openclip:ARCH/TAG", "an open_clip model"
    components = frozenset({"clip"})

    def parse(self, spec, component):
        if not spec.startswith("openclip:"):
            return None
        body = spec[len("openclip:"):]
        arch, _, tag = body.partition("/")
        if not arch or not tag:
            raise ModelLoadError(spec, "expected openclip:ARCH/TAG",
                                 "e.g. openclip:ViT-B-32/laion2b_s34b_b79k; `clipkit models` lists some")
        return ModelSpec(spec, self, body, {"arch": arch, "tag": tag}, component)

    def _check(self, s: ModelSpec) -> bool:
        """Validate arch and tag; -> whether the tag is a local weights file."""
        import open_clip
        arch, tag = s.extra["arch"], s.extra["tag"]
        if arch not in open_clip.list_models():
            raise ModelLoadError(s.raw, f"unknown open_clip architecture {arch!r}",
                                 "see open_clip.list_models(), e.g. ViT-B-32, ViT-B-32-quickgelu")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags and not Path(tag).is_file():
            raise ModelLoadError(s.raw, f"unknown pretrained tag {tag!r} for {arch}",
                                 f"choose one of: {', '.join(tags) or '(none)'}")
        if not Path(tag).is_file():
            hub.require_cached_or_online(s)
            return False
        return True

    def resolve(self, s):
        local_file = self._check(s)
        hub.short_timeouts()
        return Resolved(s, s.target, local_file or hub.offline() or s.available()[0], False)

    def is_available(self, s):
        try:
            import open_clip
            cfg = open_clip.get_pretrained_cfg(s.extra["arch"], s.extra["tag"])
        except Exception:
            cfg = {}
        repo = (cfg or {}).get("hf_hub", "").rstrip("/")
        ok = bool(repo) and hub.hub_cached(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        return ok, "in the hub cache" if ok else "not cached (needs a download)"

    def load_clip(self, s):
        self._check(s)
        arch, tag = s.extra["arch"], s.extra["tag"]
        if tag == "openai" and "quickgelu" not in arch.lower():
            # OpenAI weights were trained with QuickGELU; open_clip >= 2.29 no longer switches it on
            # for ('ViT-B-32', 'openai') and silently loses accuracy (FIELD_NOTES A).
            kwargs = {"force_quick_gelu": True}
        else:
            kwargs = {}
        return create_openclip(s, arch, tag, kwargs, hub.OFFLINE_FIX)

    def model_cfg(self, s):
        import open_clip
        return open_clip.get_model_config(s.extra["arch"])


class _LocalDirSource(Source):
    """A local directory holding ``marker``."""
    marker: ClassVar[str]

    def parse(self, spec, component):
        path = Path(spec).expanduser()
        if path.is_dir() and (path / self.marker).is_file() and self.claims(path):
            return ModelSpec(spec, self, str(path), component=component)
        return None

    def claims(self, path: Path) -> bool:
        return True


class _OpenClipDirSource(_LocalDirSource):
    """A directory in open_clip's layout (``open_clip_config.json``): its training info and model config."""

    def training_info(self, s):
        return _training_info(Path(s.target))

    def model_cfg(self, s):
        return _dir_model_cfg(s.raw, Path(s.target))


class OverlaySource(_OpenClipDirSource):
    """A partial fine-tune of another CLIP (``open_clip_config.json`` names its base): load the base,
    then replace the weights the overlay holds (:mod:`clipkit.core.artifacts`). ``shapes-noised`` is one."""
    kind, syntax, noun = "overlay", "/dir (open_clip_config.json naming a base CLIP)", "an open_clip overlay"
    marker, components = "open_clip_config.json", frozenset({"clip"})

    def claims(self, path):
        return self.base(path) is not None

    @staticmethod
    def base(path) -> str | None:
        info = _open_clip_json(path).get("clipkit", {})
        return info.get("base") if isinstance(info, dict) else None

    def load_clip(self, s):
        from clipkit.core.artifacts import apply_overlay
        base = self.base(s.target)
        if base in (s.raw, s.target):
            raise ModelLoadError(s.raw, "overlay names itself as its base", "check open_clip_config.json")
        backend = load_clip(base)
        try:
            apply_overlay(backend.module, s.target)
        except (OSError, ValueError) as e:
            raise ModelLoadError(s.raw, hub.one_line(e), f"the overlay must come from fine-tuning {base!r}") from e
        backend.spec = s.raw
        return backend



class LocalOpenClipSource(_OpenClipDirSource):
    kind, syntax, noun = "local-openclip", "/dir (open_clip_config.json + weights)", "an open_clip directory"
    marker, components = "open_clip_config.json", frozenset({"clip"})

    def load_clip(self, s):
        # open_clip only *warns* when a local dir has no weights and returns a random model: refuse.
        if not any(any(Path(s.target).glob(g)) for g in ("*.safetensors", "*.bin", "*.pth")):
            raise ModelLoadError(s.raw, "no weights file (*.safetensors, *.bin, *.pth) in the directory",
                                 "save the weights beside open_clip_config.json")
        return create_openclip(s, f"local-dir:{s.target}", None, {}, "check the directory's config and weights")



class LocalDiffusersSource(_LocalDirSource):
    kind, syntax, noun = "local-diffusers", "/dir (model_index.json: a diffusers pipeline)", "a diffusers pipeline"
    marker, components = "model_index.json", frozenset({"diffusion"})


class LocalTransformersSource(_LocalDirSource):
    kind, syntax, noun = "local-hf", "/dir (config.json: a transformers model)", "a transformers directory"
    marker, components = "config.json", frozenset({"clip", "decoder"})

    def load_clip(self, s):
        return load_hf_clip(s)

    def wrong_kind(self, spec, component):
        if component == "diffusion":
            return ModelLoadError(spec, "directory has no model_index.json",
                                  "point at a saved diffusers pipeline directory (unet/ + scheduler/)")
        return super().wrong_kind(spec, component)


class ClipCapDirSource(_LocalDirSource):
    kind, syntax, noun = "clipcap-dir", f"/dir ({CLIPCAP_CONFIG}: a clipkit captioner)", "a captioner directory"
    marker, components = CLIPCAP_CONFIG, frozenset({"captioner"})


class CheckpointFileSource(Source):
    """A single file: an official ClipCap ``.pt`` checkpoint (read safely by the captioning plugin)."""
    kind, syntax, noun = "file", "/file.pt (an official ClipCap checkpoint)", "a single file"
    components = frozenset({"captioner"})

    def parse(self, spec, component):
        path = Path(spec).expanduser()
        if not path.exists() or path.is_dir():
            return None
        if not path.is_file():                  # a FIFO, socket or device would block the loader for ever
            raise ModelLoadError(spec, "not a regular file", "point it at a checkpoint file")
        return ModelSpec(spec, self, str(path), component=component)


class AestheticSource(Source):
    """``aesthetic:PATH``: a LAION aesthetic-predictor head (linear or MLP) on CLIP image embeddings,
    a ``.pth`` state dict or ``.safetensors`` file (loaded by :func:`clipkit.core.objectives.load_aesthetic`)."""
    kind, syntax, noun = "aesthetic", "aesthetic:PATH", "an aesthetic head"
    components = frozenset({"scorer"})

    def parse(self, spec, component):
        if not spec.startswith("aesthetic:"):
            return None
        path = Path(spec[len("aesthetic:"):]).expanduser()
        if not path.is_file():
            reason = "no such file" if not path.exists() else "not a regular file"
            raise ModelLoadError(spec, reason, "point aesthetic: at a head's .pth or .safetensors file")
        return ModelSpec(spec, self, str(path), component=component)


class HfSource(Source):
    kind, syntax, noun = "hf", "hf:ORG/NAME", "a hub repository"
    components = frozenset({"clip", "diffusion", "decoder"})

    def parse(self, spec, component):
        if not spec.startswith("hf:"):
            return None
        repo = spec[3:]
        # GPT-2 decoders may use transformers' legacy one-word repos (hf:gpt2)
        ok = (repo.count("/") == 1 and all(repo.split("/"))) or (component == "decoder" and _HUB_NAME.fullmatch(repo))
        if not ok:
            raise ModelLoadError(spec, "expected hf:ORG/NAME", "e.g. hf:openai/clip-vit-base-patch32")
        return ModelSpec(spec, self, repo, component=component)

    def resolve(self, s):
        hub.short_timeouts()
        hub.require_cached_or_online(s)
        return Resolved(s, s.target, hub.offline() or s.available()[0], False)

    def is_available(self, s):
        ok = hub.hub_cached(s.target, ("config.json", "model_index.json"))
        return ok, "in the hub cache" if ok else "not cached (needs a download)"

    def load_clip(self, s):
        return load_hf_clip(s)


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?")


class HubNameSource(HfSource):
    """A GPT-2 decoder named as transformers takes it, without ``hf:`` (``gpt2``, ``ORG/NAME``)."""
    kind, syntax = "hf", "NAME | ORG/NAME (decoders)"
    components = frozenset({"decoder"})

    def parse(self, spec, component):
        if component != "decoder" or not _HUB_NAME.fullmatch(spec) or Path(spec).expanduser().exists():
            return None
        return ModelSpec(spec, self, spec, component=component)


#: every spec source, in the order :func:`parse_spec` tries them (:func:`register_source` adds one)
SOURCES: list[Source] = [BundledSource(), AestheticSource(), OpenClipSource(), HfSource(), OverlaySource(),
                         LocalOpenClipSource(), LocalDiffusersSource(), LocalTransformersSource(),
                         ClipCapDirSource(), CheckpointFileSource(), HubNameSource()]


def register_source(source: Source, first: bool = True) -> Source:
    """Add a way of writing specs (a :class:`Source` subclass instance: ``parse``, ``components``,
    ``load_clip`` or ``resolve``); ``first``: tried before the built-in ones (so ``myhub:NAME`` can
    take a prefix nobody else parses), else last. Returns it, so it can be used as a decorator's value."""
    if not isinstance(source, Source):
        raise TypeError(f"register_source takes a Source, got {type(source).__name__}")
    SOURCES.insert(0, source) if first else SOURCES.append(source)
    return source


#: diffusers ``model_index.json`` ``_class_name`` -> loader ``fn(source, spec, local_only, device, dtype)``
#: returning a diffusion backend; the guidance plugin registers its pixel and latent loaders
#: (:mod:`clipkit.guidance.diffusion`), a user registers more with :func:`register_diffusion_loader`
DIFFUSION_LOADERS: dict[str, Callable] = {}


def register_diffusion_loader(class_name: str, loader: Callable) -> Callable:
    """Load diffusers pipelines whose ``model_index.json`` names ``class_name`` with ``loader``."""
    DIFFUSION_LOADERS[class_name] = loader
    return loader


def diffusion_loader(class_name: str, spec: str) -> Callable:
    """The loader registered for a pipeline class, or a one-line ModelLoadError naming the supported ones."""
    if class_name not in DIFFUSION_LOADERS:
        raise ModelLoadError(spec, f"unsupported diffusion pipeline {class_name!r}",
                             f"supported: {', '.join(sorted(DIFFUSION_LOADERS))}")
    return DIFFUSION_LOADERS[class_name]


def assets_dir() -> Path:
    return Path(str(resources.files("clipkit") / "assets"))


def bundled_path(name: str, component: str) -> Path:
    """Directory of a bundled model, e.g. ``bundled_path("shapes", "clip")``."""
    return assets_dir() / f"{name}_{component}"


def _unknown(spec: str) -> ModelLoadError:
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelLoadError(spec, "directory has no config.json, model_index.json or open_clip_config.json",
                              "point at a saved transformers/diffusers/open_clip model directory")
    if "/" in spec or os.sep in spec or spec.startswith("."):
        return ModelLoadError(spec, "no such directory", "check the path")
    return ModelLoadError(spec, "unknown model spec", SPEC_USAGE + "; `clipkit models` lists them")


def parse_spec(spec: str, component: str = "clip") -> ModelSpec:
    """Bind a spec string to its source, for a model kind (clip, diffusion, captioner, decoder);
    raises a one-line ModelLoadError for malformed or unknown specs and for a source that cannot
    give this kind of model."""
    kind = _kind(component)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(str(spec), kind.empty, kind.empty_fix)
    spec = spec.strip()
    try:
        first = s = None
        for src in SOURCES:               # the first source that parses the spec and gives this kind
            p = src.parse(spec, kind.name)
            if p is not None:
                first = first or p
                if kind.name in src.components:
                    s = p
                    break
                if first.source.bundled:      # a bundled name is that name, whatever comes later
                    break
        s = s or first
        if s is None:
            raise _unknown(spec)
    except ModelLoadError:
        if kind.not_found:
            raise ModelLoadError(spec, kind.not_found, kind.usage) from None
        raise
    if kind.name not in s.source.components:
        raise s.source.wrong_kind(s.raw, kind.name)
    return s


def resolve(spec: str | ModelSpec, component: str = "clip") -> Resolved:
    """Where the model named by ``spec`` is, for a loader: a local path or a hub repo id, whether to stay
    offline; a hub model is checked to be cached or downloadable (fails in seconds otherwise)."""
    s = parse_spec(spec, component) if isinstance(spec, str) else spec
    return s.resolve()


def clip_training_info(spec: str) -> dict:
    """The training config saved inside a clipkit-trained CLIP (bundled or a local open_clip
    directory); {} for anything else (hub models, other formats)."""
    try:
        s = parse_spec(spec)
    except ModelLoadError:
        return {}
    return s.training_info()


def is_noise_aware(spec: str) -> bool:
    """Whether a CLIP was trained on noised images x_t (``clipkit train clip --noise-aware``)."""
    return bool(clip_training_info(spec).get("noise_aware"))


def load_clip(spec: str | ModelSpec = BUNDLED):
    """Resolve and load a CLIP model -> a :class:`~clipkit.core.backends.ClipBackend` (CPU, fp32)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    return s.load_clip()
