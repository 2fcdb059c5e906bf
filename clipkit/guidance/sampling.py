"""The one sampling loop: any *step* ``(x, t) -> StepOutput`` over any diffusers scheduler.

A step is what one iteration of a diffusers pipeline does (scale the input, call the network, let
the scheduler step), so a loop written only against diffusers' scheduler API runs it unchanged::

    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = step(x, t).prev_sample

:func:`denoise_step` makes the plain step of a denoiser ``model(x, t) -> output``; guidance
(:func:`clipkit.guidance.wrapper.guided_step`) makes a guided one with the same signature. The loop
knows nothing of guidance: :func:`iter_sample` adds only the initial noise (seeded, or given), the
img2img start part-way through the schedule, and a :class:`SampleState` after every step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from clipkit.core.errors import InputError
from clipkit.guidance.parametrisation import x0_estimate


@dataclass
class StepOutput:
    """One step's result, named as diffusers' ``SchedulerOutput``: the new sample, and the x0 estimate
    of the step's input (model space, from the model output; None when the scheduler has no VP table)."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class Step(Protocol):
    def __call__(self, x: torch.Tensor, t) -> StepOutput: ...


def step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    """``generator=`` for a stochastic scheduler's ``step`` (DDPM, Euler ancestral), else nothing
    (the signature's parameters, not its local variables)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def denoise_step(model: Callable, scheduler, generator: torch.Generator | None = None) -> Step:
    """The plain step of a denoiser ``model(x, t) -> output`` (what diffusers' pipelines do per step):
    ``model`` sees the scheduler's scaled input; ``generator`` draws a stochastic scheduler's noise."""
    extra = step_kwargs(scheduler, generator)

    def step(x: torch.Tensor, t) -> StepOutput:
        x_in = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = model(x_in, t).detach()
        x0 = x0_estimate(scheduler, out, x_in, t)
        return StepOutput(scheduler.step(out, t, x, **extra).prev_sample.detach(), x0)
    return step


@dataclass
class SampleState:
    """The sampler after step ``i`` of ``n``: the new sample and the x0 estimate of the step's input
    (model space, from the model's output: what a draft is judged by)."""
    i: int
    n: int
    t: object
    x: torch.Tensor
    x0: torch.Tensor | None


def iter_sample(step: Step, scheduler, shape: Sequence[int], steps: int, generator: torch.Generator,
                device="cpu", noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
                strength: float = 1.0) -> Iterator[SampleState]:
    """Run ``step`` over ``steps`` of ``scheduler``, yielding a :class:`SampleState` after each, so a
    caller can stop a trajectory part-way, judge it, and go on with it later (drafts). A batch of
    trajectories can go on with some of its rows only: ``states.send(rows)`` keeps those rows (of the
    sample and of the scheduler's history, :func:`select_rows`) and returns the next state; the step
    must drop the same rows of whatever it keeps per row (its generators).

    ``noise``: the initial unit-variance noise of ``shape`` (default: drawn from ``generator``, on its
    device, then moved). ``init`` (model space, ``shape``) with ``strength`` S in (0, 1]: run only the
    last ``max(1, int(steps * S))`` timesteps, starting from ``init`` noised to the first of them with
    the scheduler's own ``add_noise``, as diffusers' img2img pipelines do.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise InputError(f"strength must be in (0, 1], got {strength!r}")
    scheduler.set_timesteps(steps, device=device)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise InputError(f"initial noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise.float().to(device)
    else:
        x = torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    timesteps = list(scheduler.timesteps)
    if init is None:
        x = x * scheduler.init_noise_sigma
    else:
        if tuple(init.shape) != tuple(shape):
            raise InputError(f"init has shape {tuple(init.shape)}, expected {tuple(shape)}")
        order = getattr(scheduler, "order", 1)
        if len(timesteps) != steps * order:     # e.g. PNDM's warm-up: the timesteps are not steps x order
            raise InputError(f"{type(scheduler).__name__} runs {len(timesteps)} timesteps for {steps} steps: an "
                             "init image cannot start part-way through them; use another scheduler (DDIM)")
        keep = max(1, min(steps, int(steps * strength)))
        skip = (steps - keep) * order
        timesteps = timesteps[skip:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skip)
        x = scheduler.add_noise(init.float().to(device), x, torch.as_tensor([timesteps[0]]))
    for i, t in enumerate(timesteps):
        res = step(x, t)
        x = res.prev_sample.detach()
        rows = yield SampleState(i, len(timesteps), t, x, res.pred_original_sample)
        if rows is not None:            # ``.send(rows)``: go on with these rows of the batch only
            select_rows(scheduler, rows, x.shape[0])
            x = x[torch.as_tensor(rows, dtype=torch.long, device=x.device)]


def select_rows(scheduler, rows: Sequence[int], batch: int) -> None:
    """Keep ``rows`` of a batch in a scheduler's own state (the sample and model-output history of
    multistep schedulers: DPM-Solver, PNDM, LMS, UniPC): every tensor attribute, or tensor in a list or
    tuple attribute, whose first dimension is the batch is indexed; DDIM and DDPM keep none."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)

    def pick(v):
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == batch:
            return v[idx.to(v.device)]
        if isinstance(v, list):
            return [pick(u) for u in v]
        if isinstance(v, tuple):
            return tuple(pick(u) for u in v)
        return v
    for name, value in list(vars(scheduler).items()):
        if name in ("timesteps", "alphas_cumprod", "alphas", "betas", "sigmas", "final_alpha_cumprod"):
            continue
        new = pick(value)
        if new is not value:
            setattr(scheduler, name, new)


def sample(step: Step, scheduler, shape: Sequence[int], steps: int, generator: torch.Generator, device="cpu",
           callback: Callable | None = None, noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
           strength: float = 1.0) -> torch.Tensor:
    """:func:`iter_sample` to the end; returns the final x (model space). ``callback(i, t, x)`` after
    every step."""
    x = None
    for state in iter_sample(step, scheduler, shape, steps, generator, device, noise, init, strength):
        x = state.x
        if callback is not None:
            callback(state.i, state.t, x)
    return x
