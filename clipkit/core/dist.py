"""accelerate state, with CPU multi-process support.

Under ``accelerate launch --multi_gpu --num_processes N`` (torchrun) on a machine without CUDA,
accelerate only forms a gloo process group when asked for the CPU explicitly; these helpers do that,
so the same command shards work over N CPU processes here and N GPUs elsewhere. :func:`gather_cat`
concatenates a tensor over the processes (differentiably), for losses over the global batch.
"""
from __future__ import annotations

import torch
from torch.distributed.nn.functional import all_gather

# Imported where used: accelerate, torch (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).


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


def world_size() -> int:
    """Processes in the torch.distributed group (what ``accelerate launch`` forms); 1 when there is none."""
    import torch.distributed as td
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def gather_cat(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """``t`` [n, ...] of every process concatenated along dim 0, in process order; ``t`` itself in one process.

    Processes may hold different ``n`` (a batch that lost unreadable images). With ``grad`` the
    gather is differentiable: the gradient reaching each process's ``t`` is the sum over processes of
    the gradients of their results w.r.t. its rows (``torch.distributed.nn.functional.all_gather``).
    So when every process computes the same loss L of the gathered batch, its ``t`` gets
    N * dL/dt, and averaging parameter gradients over the N processes (DDP, accelerate) gives dL/dtheta:
    the gradients of one process training on the concatenated batch."""
    n = world_size()
    if n == 1:
        return t
    import torch.distributed as td
    size = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    td.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    if t.shape[0] < most:      # all_gather takes equal shapes: pad, then cut each part back
        t = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    t = t.contiguous()
    if grad:
        parts = all_gather(t)
    else:
        parts = [torch.empty_like(t) for _ in range(n)]
        td.all_gather(parts, t)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])
