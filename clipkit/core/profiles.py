"""Profiles: the model choices that go together, and the defaults `generate` takes on them (DESIGN §2, §6).

A profile is data: specs for each component, the words its models know (``vocabulary``), the
prompt layouts it offers (name -> ``split(prompt) -> placed objects | None``) and the defaults that
`generate` uses on its own diffusion model (best-of, selector, negatives, the CLIPs of an img2img
run, the layout). Core defines the type, the registry and the real-model ``sd`` profile; the
bundled world registers its own (``clipkit.shapes.profile``), so core never imports it. The CLI and
the Python API (:mod:`clipkit.api`) load the bundled profile before they look one up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from clipkit.core.errors import InputError, ModelLoadError
from clipkit.core.registry import SOURCES, parse_spec

DEFAULT_PROFILE = "shapes"


@dataclass(frozen=True)
class Profile:
    """The model choices that go together."""
    name: str
    clip: str
    diffusion: str | None
    captioner: str | None
    description: str
    guide: str | None = None     # the CLIP that steers `generate` (None: ``clip``)
    vocabulary: frozenset | None = None   # the words its models know (None: any); see unknown-word warnings
    best_of: int = 1             # `generate`'s default --best-of on this profile's diffusion model
    select: str = "clip"         # and its default --select (clip | caption)
    negative: tuple = ()         # and its default --negative TEXT[:STRENGTH]s ("{prompt}": each prompt part)
    init_clips: tuple = ()       # the CLIPs that guide an --init-image run on it (none: ``guide``)
    layout: str = "off"          # `generate`'s default --layout on its diffusion model
    layouts: Mapping[str, Callable] = field(default_factory=dict)   # layout name -> split(prompt) -> objects

    @property
    def guide_spec(self) -> str:
        return self.guide or self.clip


PROFILES: dict[str, Profile] = {}


def register_profile(profile: Profile) -> Profile:
    """Make a profile available by name (``--profile NAME``, ``clipkit.generate(profile=NAME)``)."""
    PROFILES[profile.name] = profile
    return profile


def get_profile(name: str | None) -> Profile:
    """A registered profile (None: the default), or an InputError naming the registered ones."""
    name = name or DEFAULT_PROFILE
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r}: choose one of {', '.join(sorted(PROFILES)) or '(none registered)'}")
    return PROFILES[name]


def layout_of(name: str, profiles: Mapping[str, Profile] | None = None) -> Callable | None:
    """The split function of layout ``name`` from the registered profiles ("off": None)."""
    if name == "off":
        return None
    for prof in (profiles or PROFILES).values():
        if name in prof.layouts:
            return prof.layouts[name]
    offered = sorted({k for p in PROFILES.values() for k in p.layouts})
    raise InputError(f"layout {name!r} is not offered by any profile: choose off" +
                     (f" or {', '.join(offered)}" if offered else ""))


def vocabulary_of(specs) -> frozenset | None:
    """The words the models named by ``specs`` know: the vocabulary of the first profile that uses one
    of them (None: no profile declares one; real models know any word)."""
    for spec in specs:
        for prof in PROFILES.values():
            if prof.vocabulary is not None and spec in (prof.clip, prof.guide, prof.diffusion, prof.captioner,
                                                        *prof.init_clips):
                return prof.vocabulary
    return None


register_profile(Profile("sd", "openclip:ViT-B-32/laion2b_s34b_b79k",
                         "hf:stable-diffusion-v1-5/stable-diffusion-v1-5", None,
                         "real models from the hub (needs a network once, or a cache); "
                         "point --captioner at a ClipCap checkpoint"))


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


def is_available(spec: str, component: str = "clip") -> tuple[bool, str]:
    """Whether ``spec`` can be loaded offline right now, and a short note why (not)."""
    try:
        s = parse_spec(spec, component)
    except ModelLoadError as e:
        return False, e.reason
    return s.available()


def list_sources() -> list[dict]:
    """Every spec source: its name, how its specs are written, and the model kinds it gives."""
    return [{"kind": src.kind, "syntax": src.syntax, "components": sorted(src.components)} for src in SOURCES]


#: the components a profile names, in the order `clipkit models` lists them, and a note on each
PROFILE_COMPONENTS = {"clip": "", "guide": "; guides `generate`", "diffusion": "", "captioner": ""}


def list_models() -> list[ModelEntry]:
    """Every profile's models (each through the one registry, as its kind), with whether each is
    available offline."""
    out = []
    for prof in PROFILES.values():
        for comp, note_extra in PROFILE_COMPONENTS.items():
            spec = getattr(prof, comp)
            if spec is None:
                if comp != "guide":         # no guide: the profile's clip guides
                    out.append(ModelEntry("-", comp, prof.name, False, "user supplies --" + comp))
                continue
            ok, note = is_available(spec, comp)
            out.append(ModelEntry(spec, comp, prof.name, ok, note + note_extra))
    return out
