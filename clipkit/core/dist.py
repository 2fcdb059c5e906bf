"""accelerate state, with CPU multi-process support.

Under ``accelerate launch --multi_gpu --num_processes N`` (torchrun) on a machine without CUDA,
accelerate only forms a gloo process group when asked for the CPU explicitly; these helpers do that,
so the same command shards work over N CPU processes here and N GPUs elsewhere.
"""
from __future__ import annotations

import torch


def _cpu_only() -> bool:
    """Ask accelerate for the CPU explicitly only when there is no accelerator at all (CUDA or Apple's
    MPS); otherwise accelerate picks the device itself (MPS included)."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def partial_state():
    from accelerate import PartialState
    return PartialState(cpu=_cpu_only())


def accelerator(**kwargs):
    from accelerate import Accelerator
    return Accelerator(cpu=_cpu_only(), **kwargs)
