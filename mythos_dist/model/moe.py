"""DeepSeekMoE-style FFN as separate small pieces: router → token dispatcher → experts → combine.

The router picks top-k routed experts per token (weights renormalised over the chosen k; top-1
keeps its softmax probability, as in Switch); shared experts see every token. Tokens are grouped per expert by a dispatcher (`dispatch.py`): locally by sorting, or across
an expert-parallel group by all-to-all. The router and experts do not know which one is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from mythos_dist.model.dispatch import LocalDispatcher, TokenDispatcher, count_per_expert
from mythos_dist.model.softmax import softmax_lastdim


@dataclass
class RouterOutput:
    weights_NK: torch.Tensor  # gate weights of the chosen experts (k > 1: renormalised over them)
    expert_ids_NK: torch.Tensor  # global expert ids, long
    tokens_per_expert_E: torch.Tensor  # assignments per global expert in this call (before drops)
    aux_loss: torch.Tensor  # scalar; zero unless aux_loss_coef > 0


class Router(nn.Module):
    """Top-k softmax router with aux-loss-free balancing (DeepSeek-V3) and an optional aux loss.

    The balancing bias shifts only *which* experts are selected; gate weights come from the
    unbiased scores, so the bias never enters the gradient. `update_bias` moves it each step
    against the observed load (`load_E`, accumulated over every call since the last update).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, bias_update_rate: float, aux_loss_coef: float):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.bias_update_rate, self.aux_loss_coef = bias_update_rate, aux_loss_coef
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts))  # persistent: part of the checkpoint
        self.register_buffer("load_E", torch.zeros(n_experts), persistent=False)
        self.count_load = True  # off while activation checkpointing recomputes a forward

    def reset_parameters(self) -> None:
        """The buffers; `gate` is a Linear, initialised with the model's matrices."""
        self.expert_bias.zero_()
        self.load_E.zero_()

    def forward(self, x_ND: torch.Tensor) -> RouterOutput:
        scores_NE = softmax_lastdim(self.gate(x_ND).float())
        expert_ids_NK = torch.topk(scores_NE + self.expert_bias, self.top_k, dim=-1).indices
        weights_NK = scores_NE.gather(-1, expert_ids_NK)
        if self.top_k > 1:
            # Top-1 is not renormalised (Switch): its weight would be ≡ 1 and the gate would get
            # no gradient from the task loss.
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        tokens_per_expert_E = count_per_expert(expert_ids_NK, self.n_experts)
        if self.training and self.count_load:
            self.load_E += tokens_per_expert_E
        aux_loss = scores_NE.new_zeros(())
        if self.aux_loss_coef > 0:
            # Switch-style, per token of this call: E · Σ_e (fraction of assignments to e) · (mean
            # router prob of e). The model averages it over its MoE layer uses (e.g. loops).
            frac_E = tokens_per_expert_E.float() / expert_ids_NK.numel()
            aux_loss = self.aux_loss_coef * self.n_experts * (frac_E * scores_NE.mean(0)).sum()
        return RouterOutput(weights_NK.to(x_ND.dtype), expert_ids_NK, tokens_per_expert_E, aux_loss)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor | None = None) -> torch.Tensor:
        """One balancing step from the observed load; returns that load and resets the counter.

        Under data parallelism pass the load summed over all ranks so biases stay identical.
        """
        load_E = self.load_E.clone() if load_E is None else load_E.to(self.load_E)
        if self.bias_update_rate > 0 and load_E.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_E.zero_()
        return load_E


@contextmanager
def load_counting_paused(module: nn.Module) -> Iterator[None]:
    """Routers inside `module` do not add to their load: a recomputed forward routes the same tokens again."""
    routers = [m for m in module.modules() if isinstance(m, Router)]
    for r in routers:
        r.count_load = False
    try:
        yield
    finally:
        for r in routers:
            r.count_load = True


# --------------------------------------------------------------------------- experts


@cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """F.grouped_mm exists on recent torch but not for every device/dtype; probe once."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.zeros(8, 16, device=device_type, dtype=dtype)
        b = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.tensor([4, 8], device=device_type, dtype=torch.int32))
        F.grouped_mm(a.t(), a, offs=torch.tensor([4, 8], device=device_type, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _mm_groups(
    a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int] | None
) -> torch.Tensor:
    """Grouped product. a (M,K) @ b (G,K,N) -> (M,N) rows grouped; a (K,M) @ b (M,N) -> (G,K,N).
    Groups may end before row M: F.grouped_mm leaves those rows unwritten, the fallback zero."""
    if a.is_meta:  # shapes only (the memory planner runs the model on the meta device)
        return (
            a.new_empty(a.shape[0], b.shape[-1])
            if b.dim() == 3
            else a.new_empty(len(offs), a.shape[0], b.shape[1])
        )
    if counts is None:
        return F.grouped_mm(a, b, offs=offs)
    # Rows past the last group (a padded dispatch's padding) are in no product; zeros out.
    pad = a.shape[0 if b.dim() == 3 else 1] - sum(counts)
    if b.dim() == 3:
        parts = [x @ w for x, w in zip(torch.split(a, [*counts, pad]), b.unbind(0))]
        return torch.cat([*parts, a.new_zeros(pad, b.shape[-1])])
    pairs = zip(torch.split(a, [*counts, pad], dim=1)[: len(counts)], torch.split(b, [*counts, pad]))
    return torch.stack([x @ y for x, y in pairs])


class _GroupedMatmul(torch.autograd.Function):
    """y[rows of group g] = x[rows of group g] @ w[g]; one kernel per product where supported."""

    @staticmethod
    def forward(ctx, x_MK, w_GKN, offs_G, counts):  # type: ignore[override]
        ctx.save_for_backward(x_MK, w_GKN, offs_G)
        ctx.counts = counts
        return _mm_groups(x_MK, w_GKN, offs_G, counts)

    @staticmethod
    def backward(ctx, dy_MN):  # type: ignore[override]
        x_MK, w_GKN, offs_G = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = _mm_groups(dy_MN, w_GKN.transpose(1, 2), offs_G, ctx.counts) if ctx.needs_input_grad[0] else None
        dw = _mm_groups(x_MK.t(), dy_MN, offs_G, ctx.counts) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def _grouped_mm_fits(x_MK: torch.Tensor, w_GKN: torch.Tensor) -> bool:
    """F.grouped_mm runs this product (else the per-expert fallback, which needs host counts)."""
    aligned = all(s * x_MK.element_size() % 16 == 0 for s in (w_GKN.shape[1], w_GKN.shape[2]))
    return aligned and _grouped_mm_works(x_MK.device.type, x_MK.dtype)


def grouped_matmul(
    x_MK: torch.Tensor,
    w_GKN: torch.Tensor,
    tokens_per_group_G: torch.Tensor,
    host_counts: list[int] | None = None,
) -> torch.Tensor:
    """Rows of x are grouped contiguously (group g has tokens_per_group_G[g] rows).

    host_counts: the same sizes already on the host, if the caller has them (saves a sync)."""
    offs_G = torch.cumsum(tokens_per_group_G, 0).to(torch.int32)
    counts = None
    if not (x_MK.is_meta or _grouped_mm_fits(x_MK, w_GKN)):
        # The fallback needs the split sizes on the host: one sync for all groups, not one per group.
        counts = host_counts if host_counts is not None else tokens_per_group_G.tolist()
    return _GroupedMatmul.apply(x_MK.contiguous(), w_GKN, offs_G, counts)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2H) [gate | up] -> silu(gate) ⊙ up, (..., H): routed and shared experts alike."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class GroupedExperts(nn.Module):
    """`n_local` SwiGLU experts with stacked weights; rows arrive grouped by local expert.

    `first_expert_id` is the global id of local expert 0 (non-zero under expert parallelism).
    """

    def __init__(self, dim: int, hidden: int, n_local: int, first_expert_id: int = 0):
        super().__init__()
        self.n_local, self.first_expert_id, self.hidden = n_local, first_expert_id, hidden
        self.w_in_EDH = nn.Parameter(torch.empty(n_local, dim, 2 * hidden))  # [gate | up] fused
        self.w_out_EHD = nn.Parameter(torch.empty(n_local, hidden, dim))

    def shard(self, first_expert_id: int, n_local: int) -> None:
        """Keep only global experts [first_expert_id, first_expert_id + n_local) of those held now
        (on the meta device too, where nothing is copied)."""
        lo = first_expert_id - self.first_expert_id
        if lo < 0 or lo + n_local > self.n_local:
            raise ValueError(
                f"experts [{first_expert_id}, {first_expert_id + n_local}) are not among the "
                f"[{self.first_expert_id}, {self.first_expert_id + self.n_local}) held"
            )
        if n_local == self.n_local:
            return
        with torch.no_grad():
            for name in ("w_in_EDH", "w_out_EHD"):
                setattr(self, name, nn.Parameter(getattr(self, name)[lo : lo + n_local].clone()))
        self.n_local, self.first_expert_id = n_local, first_expert_id

    def forward(
        self, x_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor, host_counts: list[int] | None = None
    ) -> torch.Tensor:
        """host_counts: tokens_per_expert_E on the host if known (the all-to-all dispatcher has them)."""
        fallback = not x_MD.is_meta and not all(
            _grouped_mm_fits(x_MD, w) for w in (self.w_in_EDH, self.w_out_EHD)
        )  # fmt: skip
        if fallback and host_counts is None:
            host_counts = tokens_per_expert_E.tolist()  # one sync for both products
        hidden_MH = swiglu(grouped_matmul(x_MD, self.w_in_EDH, tokens_per_expert_E, host_counts))
        return grouped_matmul(hidden_MH, self.w_out_EHD, tokens_per_expert_E, host_counts)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (prelude/coda FFN and the fused shared experts)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(swiglu(self.w_in(x)))


class MoEFFN(nn.Module):
    """Routed experts (top-k, via a token dispatcher) plus always-on shared experts.

    The `n_shared` shared experts are fused into one SwiGLU of width n_shared·shared_dim, which is
    the same function as their sum. `capacity_factor` 0 is dropless; otherwise each expert keeps at
    most ceil(cf·N·k/E) assignments per call and dropped ones contribute zero.
    """

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        expert_dim: int,
        n_shared: int,
        shared_dim: int,
        capacity_factor: float = 0.0,
        bias_update_rate: float = 1e-3,
        aux_loss_coef: float = 0.0,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = Router(dim, n_experts, top_k, bias_update_rate, aux_loss_coef)
        self.experts = GroupedExperts(dim, expert_dim, n_experts)
        self.shared = SwiGLU(dim, n_shared * shared_dim) if n_shared > 0 else None
        self.dispatcher: TokenDispatcher = LocalDispatcher(n_experts)

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output (B,T,D), aux_loss scalar)."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        route = self.router(x_ND)
        x_MD, tokens_per_local_E, state = self.dispatcher.dispatch(
            x_ND, route.expert_ids_NK, self.capacity(x_ND.shape[0])
        )
        y_MD = self.experts(x_MD, tokens_per_local_E, state.tokens_per_local_L)
        y_ND = self.dispatcher.combine(y_MD, route.weights_NK, state)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        return y_ND.view_as(x_BTD), route.aux_loss
