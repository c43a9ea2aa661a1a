"""torch.distributed helpers that hold on both backends. NCCL (train.use_gpu) reduces CUDA tensors
only: a CPU tensor handed to it fails with "No backend type associated with device type cpu";
gloo (CPU runs) takes CPU tensors. Verified on CPU (gloo) only; the NCCL branch is written for the
process group Ray Train sets up with use_gpu (it makes the worker's GPU the current device)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where a tensor must be to go through a collective of the default process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_scalar(x: float, op=dist.ReduceOp.SUM) -> float:
    """x reduced over every rank (in float64), as a Python float; x itself with one process."""
    if rank_world()[1] == 1:
        return float(x)
    t = torch.tensor([x], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=op)
    return t.item()


def all_reduce_sums(*xs: float) -> tuple[float, ...]:
    """Each x summed over every rank (in float64): one collective for several sums."""
    if rank_world()[1] == 1:
        return tuple(float(x) for x in xs)
    t = torch.tensor(xs, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag True where any rank passed True: one collective for several yes/no decisions that every
    rank must take alike."""
    if rank_world()[1] == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def exit_together() -> None:
    """End a process of a torch.distributed.run / spawn group: every rank waits for the others, then exits
    with code 0 without the process group's destructors. gloo's can abort a process that tears down while
    its peer still does ("terminate called without an active exception", SIGABRT; seen here). Write what
    the process leaves behind before calling it."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
