"""Collectives on small host (CPU) tensors: counters, flags and statistics every rank must agree on."""

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
