"""A profile's `generate` defaults, applied in one place for the CLI, ``clipkit.generate`` and the studio.

On its own diffusion model a profile chooses what its measured figures used (BENCHMARKS.md): the guide
CLIP (another pair for img2img), best-of, the selector, the layout and its negatives (the Shapes
profile: best-of 3 by the captioner, the 3x3 layout grid, the count guard). Everything the user gave
wins; ``None`` means "not given". On another diffusion model the plain defaults hold (best-of 1,
select by CLIP, layout off, no negatives), since the profile's numbers were not measured there.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

from clipkit.core.errors import InputError
from clipkit.core.profiles import Profile, layout_of
from clipkit.guidance.config import GenerateConfig, steps_for_strength
from clipkit.guidance.prompting import why_no_layout

log = logging.getLogger(__name__)

#: words that say nothing about what to draw: a prompt whose known words are all of these (on a profile
#: with a vocabulary) would run the whole job on noise
FUNCTION_WORDS = frozenset({"a", "an", "the", "and", "at", "in", "is", "of", "on", "to", "there", "with"})

#: steps an image runs by default (with an init image: of the schedule's last part, see steps_for_strength)
DEFAULT_STEPS = 25


@dataclass
class GenerateSetup:
    """What :func:`apply_profile` settles: the arguments of :func:`clipkit.guidance.pipeline.generate`
    (``select`` is the selector's name: "clip" or "caption"; the caller builds a caption selector)."""
    prompts: list[str]
    diffusion: object                   # a spec or a loaded backend
    clip: object                        # a spec, a scorer, or a list of them (an ensemble)
    options: dict = field(default_factory=dict)     # GenerateConfig fields
    select: str = "clip"


def spec_of(model) -> str:
    return model if isinstance(model, str) else getattr(model, "spec", type(model).__name__)


def check_known(profile: Profile, prompts: Sequence[str]) -> None:
    """On a profile whose models know a closed world (a ``vocabulary``): an InputError for a prompt none
    of whose words they know (beyond function words), before any model loads or any step runs."""
    if profile.vocabulary is None:
        return
    for p in prompts:
        words = set(re.findall(r"[a-z]+", p.lower()))
        if words and not (words & profile.vocabulary) - FUNCTION_WORDS:
            raise InputError(f"{p!r}: the {profile.name} profile's models know none of its words ({profile.description}); "
                             "use --profile sd, or --diffusion SPEC and --clip SPEC (or --force to run anyway)")


def apply_profile(profile: Profile, prompts: str | Sequence[str], *, diffusion=None, clip=None,
                  select: str | None = None, force: bool = False, **options) -> GenerateSetup:
    """The profile's defaults for what was not given (None), and warnings where a choice cannot apply.

    ``options`` are :class:`~clipkit.guidance.config.GenerateConfig` fields; ``steps``, ``best_of``,
    ``layout`` and ``negative`` may be None (not given). A ``negative`` list holding an empty text
    drops the profile's negatives (the CLI's ``--negative ''``). On the profile's own models, a prompt
    they cannot know is an error unless ``force`` (:func:`check_known`).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    image_prompts = list(options.get("image_prompts") or [])
    if not prompts:
        if not image_prompts:
            raise InputError("give a prompt, or an image prompt to guide by an image alone")
        prompts = [""]
    if select not in (None, "clip", "caption"):
        raise InputError(f"select must be 'clip' or 'caption', got {select!r}")
    diffusion = diffusion if diffusion is not None else profile.diffusion
    if diffusion is None:
        raise InputError(f"profile {profile.name!r} has no default diffusion model: give one")
    own = spec_of(diffusion) == profile.diffusion        # the profile's defaults hold for its own model
    if own and not force:
        check_known(profile, prompts)
    init_image = options.get("init_image")
    if clip is None or (isinstance(clip, (list, tuple)) and not clip):
        clip = list(profile.init_clips) if init_image and own and profile.init_clips else profile.guide_spec
    if options.get("steps") is None:                      # 25 steps run, with or without an init image
        options["steps"] = steps_for_strength(DEFAULT_STEPS, options.get("strength", 0.5)) if init_image \
            else DEFAULT_STEPS
    if options.get("best_of") is None:
        options["best_of"] = profile.best_of if own else 1
    explicit_layout = options.get("layout") is not None
    if not explicit_layout:
        options["layout"] = profile.layout if own else "off"
    if options["layout"] != "off":       # say where it does not apply: asked for, or a prompt of placed objects
        split = layout_of(options["layout"])
        asked = GenerateConfig(layout=options["layout"], image_prompts=image_prompts,
                               scorers=list(options.get("scorers") or []), cutouts=options.get("cutouts", 0),
                               cut_schedule=options.get("cut_schedule"))
        for p in prompts:
            why = why_no_layout(p, asked)
            if why and (explicit_layout or split(p)):
                log.warning("--layout %s: %r guides as one text: %s", options["layout"], p, why)
    # the profile's negatives (its count guard) come first, unless an empty one drops them; giving
    # the profile's own negative again does not double its strength
    given = [options["negative"]] if isinstance(options.get("negative"), str) else list(options.get("negative") or [])
    keep_default = own and all(t.strip() for t in given)
    negatives = list(dict.fromkeys([*(profile.negative if keep_default else ()), *(t for t in given if t.strip())]))
    if not any(p.strip() for p in prompts) and any("{prompt}" in t and t not in profile.negative for t in negatives):
        log.warning("a {prompt} negative needs a text prompt: with image prompts only it is left out")
    options["negative"] = negatives
    explicit_select = select is not None
    if select is None:
        # the captioner judges an image against a text: with image prompts alone there is none
        select = profile.select if own and any(prompts) else "clip"
    if explicit_select and select != "clip" and options["best_of"] == 1 and options.get("drafts", 1) == 1:
        log.warning("--select %s chooses among --best-of candidates; with --best-of 1 there is nothing to choose",
                    select)
    return GenerateSetup(prompts, diffusion, clip, options, select)
