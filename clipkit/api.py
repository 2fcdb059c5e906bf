"""The Python API of the main jobs, with the same defaults as the CLI (DESIGN §6).

``clipkit.generate`` is ``clipkit generate``: the profile's defaults (:func:`clipkit.guidance.defaults.apply_profile`)
and, where the profile selects by caption, the captioning plugin's selector, then the one generate
path (:func:`clipkit.guidance.pipeline.generate`). So::

    import clipkit
    result = clipkit.generate("a red circle at the top left", n=2, seed=3, out_dir="generated")
    for im in result.images:
        print(im.path, clipkit.caption([im.image])[0].text)

writes the same bytes as ``clipkit generate "a red circle at the top left" -n 2 --seed 3``.
This module sits above the plugins (it joins guidance and captioning) and loads the bundled profile.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import clipkit.shapes.profile  # noqa: F401  (registers the bundled `shapes` profile)
from clipkit.captioning.captioner import CaptionEndSelector, load_captioner
from clipkit.core.errors import InputError
from clipkit.core.profiles import get_profile
from clipkit.guidance.defaults import apply_profile
from clipkit.guidance.pipeline import generate as generate_with
from clipkit.guidance.results import GenerateResult


class LazyCaptionSelector:
    """:class:`~clipkit.captioning.captioner.CaptionEndSelector` whose captioner loads at the first call,
    so every input is validated (inside ``generate``) before any model loads."""
    name = "caption"
    weight = CaptionEndSelector.weight

    def __init__(self, spec: str, device="auto"):
        self.spec, self.device, self._sel = spec, device, None

    def __call__(self, images, prompt, clip_scores):
        if self._sel is None:
            self._sel = CaptionEndSelector(load_captioner(self.spec, device=self.device))
        return self._sel(images, prompt, clip_scores)


def generate(prompts: str | Sequence[str] = (), n: int = 4, *, seed: int | None = None, profile: str | None = None,
             diffusion=None, clip=None, select: str | None = None, captioner: str | None = None,
             device="auto", precision: str = "fp32", out_dir=None, overwrite: bool = False,
             on_step: Callable[[int, int], None] | None = None, on_preview: Callable | None = None,
             preview_every: int = 5, on_image: Callable | None = None, cancel: Callable[[], bool] | None = None,
             force: bool = False, threads: int | None = None, **options) -> GenerateResult:
    """Generate ``n`` images per prompt, as ``clipkit generate`` does (same defaults, same images).

    Args:
        prompts: a prompt or a list ("a red circle:2 | a square:-1" weights parts); may be empty with
            ``image_prompts``.
        n: images kept per prompt (the CLI's ``-n``, default 4).
        seed: first seed (None: random, recorded); candidate k of each prompt uses ``seed + k``.
        profile: ``shapes`` (default, bundled) or ``sd`` or a registered one; its models and, on its own
            diffusion model, its defaults (best-of, selector, layout, negatives, img2img CLIPs).
        diffusion / clip: override the profile's models (specs, or loaded objects; ``clip`` a list for an ensemble).
        select: ``"clip"`` or ``"caption"`` (None: the profile's); ``captioner`` for the latter.
        out_dir: write ``<slug>-<seed>.png`` + ``.json`` there (never replacing files without ``overwrite``).
        on_step: ``on_step(done, total)`` after every denoising step.
        on_preview / preview_every / on_image / cancel: live previews, each kept image as it is ready,
            and cancellation within one step (:func:`clipkit.guidance.pipeline.generate`).
        force: run a prompt the profile's models know none of the words of (else an InputError first).
        threads: torch CPU threads for this call (restored after it); None: :data:`DEFAULT_THREADS` (1:
            fastest for the bundled models on a shared CPU, and the same bytes on any machine, since
            the thread count changes float rounding; BENCHMARKS.md); 0: leave torch's setting.
        options: :class:`~clipkit.guidance.config.GenerateConfig` fields (``steps``, ``clip_scale``,
            ``best_of``, ``negative``, ``image_prompts``, ``init_image``, ``strength``, ``layout``, ...).
    Returns:
        a :class:`~clipkit.guidance.results.GenerateResult` (``.images``: PIL images, seeds, scores, paths).
    """
    prof = get_profile(profile)
    setup = apply_profile(prof, prompts, diffusion=diffusion, clip=clip, select=select, force=force, **options)
    selector = None
    if setup.select == "caption" and (setup.options["best_of"] > 1 or setup.options.get("drafts", 1) > 1):
        spec = captioner or prof.captioner
        if spec is None:
            raise InputError(f"select='caption' needs a captioner: profile {prof.name!r} has none; give captioner=SPEC")
        selector = LazyCaptionSelector(spec, device)
    with torch_threads(DEFAULT_THREADS if threads is None else threads):
        return generate_with(setup.prompts, n, seed=seed, diffusion=setup.diffusion, clip=setup.clip, device=device,
                             precision=precision, out_dir=out_dir, overwrite=overwrite, on_step=on_step,
                             select=selector, on_preview=on_preview, preview_every=preview_every, on_image=on_image,
                             cancel=cancel, **setup.options)


#: torch threads of ``generate`` (the CLI's and the API's): one (BENCHMARKS.md, "Speed of the main job")
DEFAULT_THREADS = 1


@contextmanager
def torch_threads(n: int):
    """torch's intra-op CPU threads set to ``n`` inside the block (0: left as they are), restored after."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InputError(f"threads must be an integer >= 0 (0: torch's own setting), got {n!r}")
    import torch
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)
