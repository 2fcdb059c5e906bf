"""The diffusers schedulers the samplers offer, by short name (one table for pixel and latent models).

Each is built with ``from_config`` of the model's own scheduler config, so the training schedule
(betas, ``prediction_type``, timestep spacing) carries over whichever kind the model shipped with.
"""
from __future__ import annotations

import inspect

from clipkit.core.errors import InputError

#: scheduler name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "pndm": ("PNDMScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
#: schedulers that keep their own sample history, so shifting the sample between steps
#: (``apply="sample"``) diverges; they get the output correction (tests/guidance/test_wrapper.py).
OUTPUT_ONLY = {"pndm"}

#: latents are not in [-1, 1]: no sample clipping or thresholding (set where the class has them)
_LATENT_OFF = ("clip_sample", "thresholding")


def make_scheduler(name: str, config, latent: bool = False):
    """A diffusers scheduler of kind ``name`` with the noise schedule and ``prediction_type`` of ``config``.

    ``latent=True`` (Stable Diffusion style models): sample clipping and thresholding are switched off,
    and PNDM skips its Runge-Kutta warm-up steps, as Stable Diffusion's own scheduler config does.
    """
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    import diffusers
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    over = dict(extra)
    if latent:
        params = inspect.signature(cls.__init__).parameters
        over.update({k: False for k in _LATENT_OFF if k in params})
        if name == "pndm":
            over["skip_prk_steps"] = True
    return cls.from_config(dict(config), **over)


def count_timesteps(name: str, config, steps: int, spec: str, latent: bool = False) -> int:
    """Timesteps (network calls) that ``steps`` take with scheduler ``name``; InputError when it cannot run them."""
    sched = make_scheduler(name, config, latent=latent)
    try:
        sched.set_timesteps(steps)
    except Exception as e:   # e.g. PNDM with Runge-Kutta warm-up needs more steps
        from clipkit.core.hub import one_line
        raise InputError(f"scheduler {name!r} cannot run {steps} steps for {spec!r} "
                         f"({type(e).__name__}: {one_line(e)}); try more steps or another scheduler") from None
    return len(sched.timesteps)
