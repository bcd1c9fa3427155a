"""Token dispatchers: group routed token copies by expert, and scatter expert outputs back.

`LocalDispatcher` sorts the N·k assignments by expert id (no loop over experts, no host sync).
`AllToAllDispatcher` does the same, then exchanges rows with the other ranks of an expert-parallel
group so each rank runs only its n_experts/ep_size local experts. Router and experts are unchanged.

Host syncs: all_to_all_single takes its split sizes as host integers, and they depend on this
call's routing (which depends on the previous loop's output), so the all-to-all dispatcher reads
them once per call: one sync per MoE layer use, for the send and receive splits and the rows per
local expert together. `PaddedAllToAllDispatcher` (parallel.ep_dispatch: padded) reads one per
forward instead (the ranks' token counts): a fixed buffer per destination rank, which for a
dropless routing must hold the worst case (every token's k copies to one rank), ep_size·min(k, L)/k
times the rows sent and carried through the experts' elementwise passes (docs/benchmarks.md,
"Host syncs"). Both give bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist


@dataclass
class DispatchState:
    token_idx_M: torch.Tensor  # source token of each kept, expert-sorted assignment
    assign_idx_M: torch.Tensor  # index into the flattened (N·k) assignments
    n_tokens: int
    # all-to-all only
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    tokens_per_local_L: list[int] | None = None  # rows per local expert, on the host
    regroup_M: torch.Tensor | None = None  # received rows (src-major) -> local-expert-major
    # padded all-to-all only
    slot_M: torch.Tensor | None = None  # each sent row's place in the send buffer


class TokenDispatcher(Protocol):
    def dispatch(
        self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, capacity: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """-> (rows grouped by local expert (M,D), rows per local expert (L,), state)."""
        ...

    def combine(self, y_MD: torch.Tensor, weights_NK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """-> Σ_k weight·expert output per token (N,D)."""
        ...


def count_per_expert(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (n_experts,), long. Not bincount: its output size comes from the
    data's max, which CUDA reads back to the host (a sync per call); this size is fixed."""
    flat = expert_ids.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def sort_by_expert(
    expert_ids_NK: torch.Tensor, n_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable sort of assignments by expert; drops those past `capacity` in each expert.

    Returns (assign_idx_M, token_idx_M, kept rows per expert (E,)).
    """
    flat_ids = expert_ids_NK.flatten()
    assign_idx = torch.argsort(flat_ids, stable=True)
    counts_E = count_per_expert(flat_ids, n_experts)
    if capacity is not None:
        sorted_ids = flat_ids[assign_idx]
        start_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert = torch.arange(flat_ids.numel(), device=flat_ids.device) - start_E[sorted_ids]
        assign_idx = assign_idx[rank_in_expert < capacity]
        counts_E = counts_E.clamp(max=capacity)
    return assign_idx, assign_idx // expert_ids_NK.shape[1], counts_E


def _combine(y_MD: torch.Tensor, weights_NK: torch.Tensor, state: DispatchState) -> torch.Tensor:
    w_M = weights_NK.flatten()[state.assign_idx_M].unsqueeze(-1)
    out = y_MD.new_zeros(state.n_tokens, y_MD.shape[-1])
    return out.index_add(0, state.token_idx_M, y_MD * w_M)


class LocalDispatcher:
    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x_ND, expert_ids_NK, capacity):
        assign_idx, token_idx, counts_E = sort_by_expert(expert_ids_NK, self.n_experts, capacity)
        # index_select, not x_ND[token_idx]: a third of the time here, both ways
        return x_ND.index_select(0, token_idx), counts_E, DispatchState(token_idx, assign_idx, x_ND.shape[0])

    def combine(self, y_MD, weights_NK, state):
        return _combine(y_MD, weights_NK, state)


class AllToAll(Protocol):
    """all_to_all_single(out, inp, out_splits, in_splits) over one expert-parallel group."""

    def __call__(
        self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> None: ...  # fmt: skip


class ProcessGroupAllToAll:
    """The group's own all_to_all_single (gloo, NCCL). Between ranks of one host on gloo, the
    trainer uses local sockets instead (mythos_dist.ep_transport, parallel.ep_transport)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def __call__(self, out, inp, out_splits=None, in_splits=None):
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the gradient travels back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, all_to_all):  # type: ignore[override]
        ctx.send_splits, ctx.recv_splits, ctx.all_to_all = send_splits, recv_splits, all_to_all
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        all_to_all(out, x.contiguous(), recv_splits, send_splits)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # Through apply, not a bare collective: differentiable again, so double backward (the
        # Jacobian-vector products of the stability tools) passes the all-to-all too.
        return _AllToAll.apply(grad, ctx.recv_splits, ctx.send_splits, ctx.all_to_all), None, None, None


class AllToAllDispatcher:
    """Expert parallelism: rank r of the EP group holds global experts [r·L, (r+1)·L).
    all_to_all: how the group exchanges rows (default: the group's own all_to_all_single)."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None, all_to_all: AllToAll | None = None):
        self.group = group
        self.all_to_all = all_to_all or ProcessGroupAllToAll(group)
        self.ep_size = dist.get_world_size(group)
        self.n_experts = n_experts
        self.n_local = n_experts // self.ep_size

    def dispatch(self, x_ND, expert_ids_NK, capacity):
        assign_idx, token_idx, counts_E = sort_by_expert(expert_ids_NK, self.n_experts, capacity)
        # How many rows each source rank sends to each of my local experts: (ep, L).
        recv_counts = torch.empty_like(counts_E)
        self.all_to_all(recv_counts, counts_E)
        recv_counts_SL = recv_counts.view(self.ep_size, self.n_local)
        tokens_per_local_L = recv_counts_SL.sum(0)
        # One host sync for every size below (all_to_all_single needs its splits on the host).
        sizes = torch.cat(
            [counts_E.view(self.ep_size, self.n_local).sum(1), recv_counts_SL.sum(1), tokens_per_local_L]
        ).tolist()
        ep = self.ep_size
        send_splits, recv_splits, per_local = sizes[:ep], sizes[ep : 2 * ep], sizes[2 * ep :]
        x_recv = _AllToAll.apply(x_ND.index_select(0, token_idx), send_splits, recv_splits, self.all_to_all)
        # Rows arrive source-major; experts want them grouped by local expert.
        local_id = torch.arange(self.n_local, device=x_ND.device).repeat(ep)
        local_id_M = torch.repeat_interleave(local_id, recv_counts_SL.flatten(), output_size=sum(recv_splits))
        regroup = torch.argsort(local_id_M, stable=True)
        state = DispatchState(
            token_idx, assign_idx, x_ND.shape[0], send_splits, recv_splits, per_local, regroup
        )
        return x_recv[regroup], tokens_per_local_L, state

    def combine(self, y_MD, weights_NK, state):
        y_recv = torch.empty_like(y_MD).index_copy(0, state.regroup_M, y_MD)  # undo regroup
        y_sent = _AllToAll.apply(y_recv, state.recv_splits, state.send_splits, self.all_to_all)
        return _combine(y_sent, weights_NK, state)


class PaddedAllToAllDispatcher(AllToAllDispatcher):
    """Expert parallelism without a host sync per MoE layer use: each rank sends every peer a
    buffer of a fixed N·min(k, L) rows (N: the sender's tokens; a token's k experts are distinct,
    so at most min(k, L) of its copies go to one rank: dropless for any routing), the real rows
    first. The ranks' token counts are exchanged once per forward (`new_forward`, called by a
    forward pre-hook of the model, see use_all_to_all: every loop routes the same tokens); all
    other sizes stay on the device. The receiver finds each row's local expert from the exchanged
    counts; padding rows sort last, past the grouped GEMMs' last group (never computed into a real
    row, never sent back into one). The same rows in the same order as AllToAllDispatcher:
    bit-identical outputs."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup | None, all_to_all: AllToAll | None = None):
        super().__init__(n_experts, group, all_to_all)
        self.rank = dist.get_rank(group)
        self._tokens_S: list[int] | None = None  # every rank's tokens in this forward

    def new_forward(self) -> None:
        self._tokens_S = None

    def _buffer_rows(self, x_ND: torch.Tensor, top_k: int) -> list[int]:
        """Rows of the buffer each rank sends each peer (one host read per forward)."""
        n = x_ND.shape[0]
        if self._tokens_S is None:
            tokens_S = torch.empty(self.ep_size, dtype=torch.long, device=x_ND.device)
            mine_S = torch.full((self.ep_size,), n, dtype=torch.long, device=x_ND.device)
            self.all_to_all(tokens_S, mine_S)  # each peer's count
            self._tokens_S = tokens_S.tolist()
        elif n != self._tokens_S[self.rank]:
            raise RuntimeError(
                f"padded all-to-all: {n} tokens in a later MoE call of the forward that began with "
                f"{self._tokens_S[self.rank]} (call new_forward() per forward)"
            )
        return [t * min(top_k, self.n_local) for t in self._tokens_S]

    def dispatch(self, x_ND, expert_ids_NK, capacity):
        assign_idx, token_idx, counts_E = sort_by_expert(expert_ids_NK, self.n_experts, capacity)
        ep, n_local, device = self.ep_size, self.n_local, x_ND.device
        rows_S = self._buffer_rows(x_ND, expert_ids_NK.shape[1])
        rows = rows_S[self.rank]  # what I send each peer; I receive rows_S[s] from s
        recv_counts = torch.empty_like(counts_E)
        self.all_to_all(recv_counts, counts_E)
        recv_counts_SL = recv_counts.view(ep, n_local)
        # Sorted assignments are destination-major (rank r holds experts [r·L, (r+1)·L)).
        send_S = counts_E.view(ep, n_local).sum(1)
        dest_M = expert_ids_NK.flatten()[assign_idx] // n_local
        first_S = torch.cumsum(send_S, 0) - send_S
        slot_M = dest_M * rows + torch.arange(len(assign_idx), device=device) - first_S[dest_M]
        send = x_ND.new_zeros(ep * rows, x_ND.shape[1]).index_copy(0, slot_M, x_ND.index_select(0, token_idx))
        x_recv = _AllToAll.apply(send, [rows] * ep, rows_S, self.all_to_all)
        # Local expert of each received row (source-major blocks of rows_S[s]); n_local for
        # padding, which then sorts last.
        src_R = torch.repeat_interleave(
            torch.arange(ep, device=device), torch.tensor(rows_S, device=device), output_size=sum(rows_S)
        )
        row_in_block_R = torch.cat([torch.arange(r, device=device) for r in rows_S])
        ends_RL = recv_counts_SL.cumsum(1)[src_R]
        local_R = torch.searchsorted(ends_RL, row_in_block_R[:, None], right=True).squeeze(1)
        regroup = torch.argsort(local_R, stable=True)
        state = DispatchState(
            token_idx, assign_idx, x_ND.shape[0], send_splits=[rows] * ep, recv_splits=rows_S,
            regroup_M=regroup, slot_M=slot_M,
        )  # fmt: skip
        return x_recv[regroup], recv_counts_SL.sum(0), state

    def combine(self, y_MD, weights_NK, state):
        y_recv = torch.empty_like(y_MD).index_copy(0, state.regroup_M, y_MD)  # undo regroup
        y_sent = _AllToAll.apply(y_recv, state.recv_splits, state.send_splits, self.all_to_all)
        return _combine(y_sent.index_select(0, state.slot_M), weights_NK, state)


DISPATCHERS = {"exact": AllToAllDispatcher, "padded": PaddedAllToAllDispatcher}  # parallel.ep_dispatch


def start_forward(model: torch.nn.Module) -> None:
    """A new forward begins in every padded dispatcher inside `model` (their token counts are
    exchanged again at its first MoE call). Code that runs the looped block outside the model's
    forward (the spectral tools) calls it before each such call, on every rank alike."""
    for m in model.modules():
        d = getattr(m, "dispatcher", None)
        if isinstance(d, PaddedAllToAllDispatcher):
            d.new_forward()


def use_all_to_all(
    model: torch.nn.Module, group: dist.ProcessGroup | None, kind: str, all_to_all: AllToAll | None = None
) -> None:
    """Route every MoE layer of `model` (an RDT) through an expert-parallel all-to-all of `kind`
    (DISPATCHERS) over `all_to_all` (default: the group's own); a padded one gets its per-forward
    reset from a forward pre-hook on `model`."""
    for moe in model.moe_layers():
        moe.dispatcher = DISPATCHERS[kind](moe.n_experts, group, all_to_all)
    if kind == "padded":
        start_each_forward(model)


def start_each_forward(model: torch.nn.Module) -> None:
    """A forward pre-hook on `model`: start_forward at each of its forwards."""
    model.register_forward_pre_hook(lambda module, _args: start_forward(module))
