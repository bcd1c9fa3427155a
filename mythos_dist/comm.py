"""The process group seen from one rank: joining it and its expert-parallel groups without
DeepSpeed, its rank and size (1 alone), a barrier, and collectives on small host (CPU) tensors:
counters, flags and statistics every rank must agree on."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_s: float) -> torch.device:
    """Join (or, for a plain `python` run, create) the process group, gloo on CPU and NCCL on
    CUDA, with our collective timeout; idempotent. -> this rank's device. Training adopts this
    group into DeepSpeed (`parallel.init_distributed`); evaluation needs nothing more."""
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # The deepspeed launcher exports LOCAL_SIZE; torchrun and mosaicml-streaming use LOCAL_WORLD_SIZE.
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def expert_parallel_group(ep_size: int) -> tuple[dist.ProcessGroup, int]:
    """(this rank's expert-parallel group, its index there): ep_size consecutive ranks
    [i·ep, (i+1)·ep), DeepSpeed's layout. Collective: every rank creates every group, in order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for i in range(world // ep_size):
        group = dist.new_group(list(range(i * ep_size, (i + 1) * ep_size)))
        if i == rank // ep_size:
            mine = group
    assert mine is not None, f"world size {world} is not a multiple of ep_size={ep_size}"
    return mine, rank % ep_size


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
