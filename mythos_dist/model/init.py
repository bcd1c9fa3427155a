"""Keyed initialisation: every tensor drawn from its own generator, keyed by (seed, name, expert).

A model built on the meta device and materialised only in part (one rank's experts under expert
parallelism) then gets exactly the values the full model has there: a routed expert's weights
depend on its global id, never on which rank holds it or how many experts that rank holds, and
dense weights are the same on every rank. No rank draws (or allocates) another rank's tensors.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def keyed_generator(seed: int, name: str, expert_id: int | None = None) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, parameter name[, global expert id])."""
    key = f"{seed}/{name}" if expert_id is None else f"{seed}/{name}/expert{expert_id}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def normal_(t: torch.Tensor, std: float, seed: int | None, name: str, expert_id: int | None = None) -> None:
    """In place: N(0, std²) from the keyed generator; seed None draws from torch's global RNG.

    Values are drawn in fp32 on the CPU, so a CUDA or bf16 tensor gets the same values as an fp32
    CPU one (rounded to its dtype).
    """
    if t.device.type == "meta":  # no values to draw (and the meta kernel would import torch's compiler)
        return
    if seed is None:
        t.normal_(0.0, std)
    elif t.device.type == "cpu" and t.dtype == torch.float32:
        t.normal_(0.0, std, generator=keyed_generator(seed, name, expert_id))
    else:
        g = keyed_generator(seed, name, expert_id)
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


class Embedding(nn.Embedding):
    """nn.Embedding whose own N(0, 1) init is skipped on the meta device: there it draws nothing,
    and the first meta `normal_` imports ~75 MB of torch's compiler stack into the process (every
    rank builds on meta). Elsewhere it draws as nn.Embedding does (the global RNG stream unchanged)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module.to_empty(device=device)`, uninitialised storage for every meta tensor, without
    `torch.empty_like` of a meta tensor: its Python reference implementation imports sympy and
    torch's symbolic shapes (~70 MB) into the process on first use. Parameters are contiguous."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
