"""Text -> image: a diffusion model steered by CLIP guidance, reranked by CLIP (``clipkit generate``).

:func:`generate` does, for each prompt:

1. draw ``n * best_of`` candidates with seeds ``seed, seed + 1, ...``, sampled together in batches of
   up to ``batch_size`` (one network and one CLIP call per step for all of them: :func:`run_candidates`).
   Each candidate draws its noise and its guidance views from generators of its own seed, so its seed
   fixes its image up to float rounding (a batched convolution sums in another order than a batch of
   one: ~1e-6, which can move a pixel by one level): the same command (seed and options) writes the
   same bytes on the same machine, torch build and thread count, and ``-n 1 --best-of 1 --seed S``
   regenerates the image of seed S, bit for bit with ``batch_size=1`` (each candidate alone);
2. score each candidate *as saved* (8-bit RGB) by cosine with the prompt under the guiding CLIP,
   ranked with core's ranking (:func:`clipkit.core.ranking.order`: score descending, rounded to
   1e-6, ties by seed), or by a :class:`Selector`'s scores when one is given (e.g. the captioning
   plugin's ``CaptionEndSelector``, passed in by the CLI: plugins never import each other);
3. keep the ``n`` best; optionally write ``DIR/<slug>-<seed>.png`` and a ``.json`` sidecar.

With CLIP guidance off (``clip_scale=0``) candidate seed S is, pixel for pixel (within one level in
a batch), what diffusers' own pipeline gives for ``generator=torch.Generator().manual_seed(S)`` and a batch of one, with the same
scheduler, steps and (latent) guidance scale: ``DDIMPipeline`` (eta 0), ``DDPMPipeline``,
``PNDMPipeline``, ``StableDiffusionPipeline`` (tests/conformance/test_generation.py). One exception:
a ``cfg_scale`` below 1, where diffusers switches classifier-free guidance off and clipkit keeps
``u + s (c - u)`` (``cfg_scale=0``: the unconditional model).

This module is the orchestration only; the concerns it strings together each have their own:
:mod:`~clipkit.guidance.config` (parameters), :mod:`~clipkit.guidance.prompting` (prompt -> objective),
:mod:`~clipkit.guidance.diffusion` and :mod:`~clipkit.guidance.backends` (models: pixel and latent are two
backends of this one path), :mod:`~clipkit.guidance.results` (results, file names, sidecars, safe
writes). The profile's defaults (best-of, selector, layout, negatives) are applied before, by
:func:`clipkit.guidance.defaults.apply_profile` (the CLI and ``clipkit.generate`` call it).
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from PIL import Image

from clipkit import __version__
from clipkit.core.errors import Cancelled, InputError
from clipkit.core.objectives import load_aesthetic
from clipkit.core.profiles import vocabulary_of
from clipkit.core.ranking import order
from clipkit.core.registry import is_noise_aware
from clipkit.core.scorer import load_scorer
from clipkit.guidance.backends import Conditioning, tensor_to_pil
from clipkit.guidance.config import MAX_SEED, GenerateConfig, make_config
from clipkit.guidance.defaults import spec_of
from clipkit.guidance.diffusion import load_diffusion
from clipkit.guidance.prompting import (check_parts, check_prompts, conditioning_text, init_pixels, prompt_layout,
                                        prompt_objective, read_image, score_kind, warn_unknown_words)
from clipkit.guidance.results import (SCORE_NOTES, GeneratedImage, GenerateResult, check_out_dir, parameters,
                                      plan_targets, write_image)
from clipkit.guidance.sampling import SampleState

log = logging.getLogger(__name__)


class Selector(Protocol):
    """Best-of selection: ``(candidate images, prompt, their CLIP cosines [N]) -> scores [N]``,
    higher is better; ``name`` goes in the sidecars. Plugins or the CLI supply one (e.g. the
    captioning plugin's :class:`~clipkit.captioning.captioner.CaptionEndSelector`)."""
    name: str

    def __call__(self, images: Sequence[Image.Image], prompt: str, clip_scores: torch.Tensor) -> torch.Tensor: ...


def batches(n: int, cap: int) -> list[list[int]]:
    """Indices 0..n-1 in the fewest contiguous batches of at most ``cap``, as even as can be (12 by 16:
    one batch of 12; 20 by 16: 10 + 10), so a command's batches, and so its bytes, are fixed by n and cap."""
    k = max(1, -(-n // max(1, cap)))
    size, extra = divmod(n, k)
    out, a = [], 0
    for i in range(k):
        b = a + size + (1 if i < extra else 0)
        out.append(list(range(a, b)))
        a = b
    return out


def run_candidates(pipe, cond: Conditioning, seeds: Sequence[int], config: GenerateConfig, keep: int,
                   rank: Callable, on_state: Callable[[int, object], None] | None = None
                   ) -> tuple[list[int], list[Image.Image]]:
    """Sample ``seeds`` and return ``keep`` of them finished: (their indices in ``seeds``, images).

    A backend that samples batches (``trajectories``: the pixel one) takes the seeds ``config.batch_size``
    at a time (:func:`batches`), one network and CLIP call per step for each batch; another samples
    them one by one (``trajectory``). Without drafts (``len(seeds) == keep``) every seed is sampled to
    the end. With drafts, every trajectory runs ``config.draft_steps`` steps, ``rank(images) -> scores``
    judges their x0 estimates (as 8-bit images, like the final ones), and the ``keep`` best (ties by
    seed) go on to the end in the batches they started in; the others stop there.
    """
    batched = hasattr(pipe, "trajectories")
    groups = batches(len(seeds), config.batch_size if batched else 1)
    trajs = [pipe.trajectories(cond, [seeds[k] for k in g], config) if batched else
             pipe.trajectory(cond, seeds[g[0]], config) for g in groups]
    last: dict = {}
    done = [False] * len(groups)

    def report(g: int, state) -> None:
        for r, k in enumerate(groups[g]):
            row = state if len(groups[g]) == 1 else SampleState(
                state.i, state.n, state.t, state.x[r:r + 1], None if state.x0 is None else state.x0[r:r + 1])
            last[k] = row
            if on_state:
                on_state(k, row)
        done[g] = state.i + 1 >= state.n

    def run(g: int, n: int | None, rows: list[int] | None = None) -> None:
        """``n`` more steps of batch ``g`` (None: to the end), first dropping all but ``rows`` of it."""
        j = 0
        if rows is not None and len(rows) < len(groups[g]):
            groups[g] = [groups[g][r] for r in rows]
            if not groups[g] or done[g]:
                return
            report(g, trajs[g].keep(rows))
            j = 1
        while not done[g] and (n is None or j < n):
            report(g, next(trajs[g]))
            j += 1
    if keep < len(seeds):
        for g in range(len(groups)):
            run(g, config.draft_steps)
        alive = list(range(len(seeds)))
        previews = [tensor_to_pil(pipe.to_pixels(last[k].x0 if last[k].x0 is not None else last[k].x)[0])
                    for k in alive]
        scores = torch.as_tensor(rank(previews), dtype=torch.float32)
        chosen = {alive[j] for j, _ in order([seeds[k] for k in alive], scores, keep)}
        for g in range(len(groups)):
            run(g, None, [r for r, k in enumerate(groups[g]) if k in chosen])
    else:
        for g in range(len(groups)):
            run(g, None)
    alive = sorted(k for g in groups for k in g)
    return alive, [tensor_to_pil(pipe.to_pixels(last[k].x)[0]) for k in alive]


@dataclass
class Preview:
    """A candidate part-way: its denoised estimate as an 8-bit image (what the studio shows)."""
    prompt: str
    seed: int
    step: int                       # steps done of this candidate's trajectory
    steps: int                      # of how many
    image: Image.Image


def _on_state(prompt: str, seeds: Sequence[int], pipe, counter: list, total: int, on_step, on_preview,
              preview_every: int, cancel) -> Callable:
    """The per-step callback of one prompt's candidates: progress (steps done of all), a preview every
    ``preview_every`` steps (and at each trajectory's end), and ``cancel()`` checked after every step."""
    def on_state(k: int, state) -> None:
        counter[0] += 1
        if on_step is not None:
            on_step(counter[0], total)
        if on_preview is not None and ((state.i + 1) % preview_every == 0 or state.i + 1 == state.n):
            x = state.x0 if state.x0 is not None and state.i + 1 < state.n else state.x
            on_preview(Preview(prompt, seeds[k], state.i + 1, state.n, tensor_to_pil(pipe.to_pixels(x)[0])))
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {counter[0]} of {total} steps")
    return on_state


def generate(prompts: str | Sequence[str], n: int = 1, *, seed: int | None = None,
             config: GenerateConfig | None = None, diffusion="shapes", clip="shapes-noised", device="auto",
             precision: str = "fp32", out_dir=None, overwrite: bool = False,
             on_step: Callable[[int, int], None] | None = None, select: "Selector | None" = None,
             on_preview: Callable[[Preview], None] | None = None, preview_every: int = 5,
             on_image: Callable[[GeneratedImage], None] | None = None, cancel: Callable[[], bool] | None = None,
             **options) -> GenerateResult:
    """Generate ``n`` images per prompt with CLIP guidance (and best-of-``best_of`` CLIP reranking).

    Args:
        prompts: a prompt or a list of prompts.
        n: images kept per prompt.
        seed: first seed (None: a random one, recorded); candidate k of each prompt uses ``seed + k``.
        config / options: a :class:`GenerateConfig` and/or its fields as keywords
            (``steps=``, ``clip_scale=``, ``best_of=``, ``scheduler=``, ``cutouts=``, ``size=``, ...).
        diffusion: a spec (``shapes``, a diffusers directory, ``hf:ORG/NAME``) or a loaded DiffusionBackend.
        clip: a spec or a loaded :class:`~clipkit.core.scorer.ClipScorer` (guides and scores), or a
            list of them (an ensemble, weighted by ``clip_weights``); the default is the bundled
            noise-aware Shapes CLIP (``shapes-noised``), guiding x_t.
        out_dir: write ``<slug>-<seed>.png`` + ``.json`` sidecars there; existing files are an error
            unless ``overwrite`` (checked before anything is generated).
        on_step: ``on_step(done, total)`` after every denoising step of every candidate (progress bars).
        on_preview: called with a :class:`Preview` every ``preview_every`` steps of each candidate.
        on_image: called with each kept :class:`GeneratedImage` as soon as it is ready (and written).
        cancel: checked after every step; when it returns True, :class:`~clipkit.core.errors.Cancelled`
            is raised (images already kept stay written).
        select: how best-of keeps its ``n`` (a :class:`Selector`: candidates, prompt and their CLIP
            cosines -> selection scores, higher is better); None: the CLIP cosine itself.
    """
    t0 = time.time()
    # 1. validate everything that needs no model
    cfg = make_config(config, options)
    prompts = check_prompts(prompts, allow_empty=bool(cfg.image_prompts))
    parts = [check_parts(p, cfg) for p in prompts]
    image_prompts = [(read_image(path, "image prompt"), w) for path, w in cfg.image_prompts]
    heads = [(load_aesthetic(spec), w) for spec, w in cfg.scorers]      # small files, read before any model
    init_image = read_image(cfg.init_image, "init image") if cfg.init_image else None
    clips = list(clip) if isinstance(clip, (list, tuple)) else [clip]
    if not clips:
        raise InputError("give at least one CLIP")
    if cfg.clip_weights is not None and len(cfg.clip_weights) != len(clips):
        raise InputError(f"{len(cfg.clip_weights)} clip weights for {len(clips)} CLIP(s) "
                         f"({', '.join(map(spec_of, clips))}): give one per --clip")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    n_cand = n * cfg.best_of                       # finished candidates per prompt
    n_seeds = n_cand * cfg.drafts                   # trajectories started per prompt
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - n_seeds)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - n_seeds:
        raise InputError(f"seed must be an integer in [0, {MAX_SEED - n_seeds}], got {seed!r}")
    seeds = list(range(seed, seed + n_seeds))
    vocab = vocabulary_of([*map(spec_of, clips), spec_of(diffusion)])
    if vocab is not None:                         # a bundled model: it knows only its world's words
        # the words the user wrote (a {prompt} negative would repeat the prompt's)
        warn_unknown_words([pt.text for ps in parts for pt in ps if not pt.templated], vocab)
    # 2. outputs: every file that could be written, checked before any work
    targets: dict = {}
    if out_dir is not None:
        out_dir = Path(out_dir).expanduser()
        targets = plan_targets(prompts, seeds, out_dir, overwrite)
        check_out_dir(out_dir, list(targets.values()),
                      inputs=[p for p, _ in cfg.image_prompts] + ([cfg.init_image] if cfg.init_image else []))
    # 3. models, and what they accept
    scorers = [load_scorer(c, device=device, precision=precision) if isinstance(c, str) else c for c in clips]
    scorer = scorers[0]
    if heads:
        dim = scorer.text_embeddings(["a"]).shape[-1]
        for (spec, _), (head, _) in zip(cfg.scorers, heads):
            if head.dim != dim:
                raise InputError(f"scorer {spec} takes {head.dim}-d CLIP image embeddings; the first CLIP "
                                 f"({scorer.spec}) gives {dim}-d: give a --clip it was trained on")
    pipe = load_diffusion(diffusion, device=scorer.device, precision=precision) if isinstance(diffusion, str) \
        else diffusion
    aware = [is_noise_aware(s.spec) for s in scorers]
    auto = cfg.guide_target == "auto"
    cfg = pipe.check(cfg.resolve_target(any(aware), pipe.guide_targets))   # an ensemble with one: all see x_t
    if auto and cfg.guide_target == "xt" and not all(aware):
        log.info("guide target x_t (a noise-aware CLIP is in the ensemble): %s see x_t too",
                 ", ".join(s.spec for s, a in zip(scorers, aware) if not a))
    models = {"clip": scorer.spec if len(scorers) == 1 else [s.spec for s in scorers],
              "diffusion": pipe.spec, "diffusion_kind": pipe.kind}
    per_image = pipe.steps_per_image(cfg)
    if init_image is not None:                    # img2img runs the last part of the trajectory only
        per_image = max(1, per_image * max(1, min(cfg.steps, int(cfg.steps * cfg.strength))) // cfg.steps)
    drafted = min(cfg.draft_steps, per_image) if cfg.drafts > 1 else 0
    total = n_seeds * drafted + n_cand * (per_image - drafted)
    if not isinstance(preview_every, int) or preview_every < 1:
        raise InputError(f"preview_every must be an integer >= 1, got {preview_every!r}")
    counter = [0]
    init = None if init_image is None else init_pixels(init_image, cfg.size or pipe.native_size)
    # 4. sample, score, keep the best, write
    kept: list[GeneratedImage] = []
    for pi, prompt in enumerate(prompts):
        objective = prompt_objective(prompt, parts[pi], image_prompts, scorers, cfg, cfg.size or pipe.native_size,
                                     heads)
        text, negative = conditioning_text(parts[pi])
        kind = score_kind(cfg, prompt, len(scorers))
        placed = prompt_layout(prompt, cfg)
        cond = Conditioning(objective if cfg.guided else None, text, negative, init,
                            cfg.strength if init is not None else 1.0)
        def rank(images, objective=objective, prompt=prompt):
            scores = objective.score_images(images)
            return scores if select is None else torch.as_tensor(select(images, prompt, scores), dtype=torch.float32)
        on_state = _on_state(prompt, seeds, pipe, counter, len(prompts) * total, on_step, on_preview, preview_every,
                             cancel)
        kept_idx, images = run_candidates(pipe, cond, seeds, cfg, n_cand, rank, on_state=on_state)
        finished = [seeds[k] for k in kept_idx]
        scores = objective.score_images(images)                                   # [n_cand]
        chosen = scores if select is None or n_cand == n else \
            torch.as_tensor(select(images, prompt, scores), dtype=torch.float32)
        for k, rank_ in order(finished, chosen, n):                             # the n best, ties by seed
            img = GeneratedImage(prompt, finished[k], images[k], float(scores[k]), rank_,
                                 selection_score=None if chosen is scores else float(chosen[k]), score=kind)
            if out_dir is not None:
                png = targets[(pi, finished[k])]
                sidecar = {"clipkit": __version__, "prompt": prompt, "seed": finished[k], "image": png.name,
                           "clip_score": img.clip_score, "score": kind,
                           "score_note": SCORE_NOTES[kind],
                           "rank": rank_, "candidates": n_cand, "models": models,
                           "parameters": parameters(cfg, n, seed),
                           "device": str(scorer.device), "precision": precision,
                           "size": list(img.image.size)}
                if placed:                  # the objects --layout grid scored (and guided) one by one
                    sidecar["layout"] = [asdict(p) for p in placed]
                if select is not None and (img.selection_score is not None or cfg.drafts > 1):
                    # the selector chose among the candidates, or among the drafts only (-n = candidates)
                    sidecar.update(selection=select.name, selection_score=img.selection_score,
                                   selection_weight=getattr(select, "weight", None))
                    if getattr(select, "spec", None):
                        sidecar["models"] = {**models, "selector": select.spec}
                write_image(img, png, sidecar, overwrite)
            kept.append(img)
            if on_image is not None:
                on_image(img)
    return GenerateResult(kept, cfg, models, n, seed, n_cand, time.time() - t0,
                          str(out_dir) if out_dir is not None else None)
