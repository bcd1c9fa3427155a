"""The process group seen from one rank: its rank and size (1 alone), a barrier, and collectives on
small host (CPU) tensors: counters, flags and statistics every rank must agree on."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_host(x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """all_reduce of a CPU tensor, returned on the CPU; identity without a process group.

    NCCL reduces CUDA tensors only, so there the values travel through the current GPU.
    """
    if not dist.is_initialized():
        return x
    on = x.to(f"cuda:{torch.cuda.current_device()}") if dist.get_backend() == "nccl" else x.clone()
    dist.all_reduce(on, op=op)
    return on.cpu()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """dist.barrier(); nothing without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
