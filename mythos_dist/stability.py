"""Stability diagnostics of the recurrence h_{t+1} = f(h_t, e).

Three numbers, from cheapest to most informative:
- ρ(A): spectral radius of the LTI injection's diagonal A (exact: max |A_ii|). ρ(A) < 1 makes the
  linear part contractive, but says nothing about the block added on top of it.
- Jacobian radius: an estimate of ρ(∂f/∂h) of the WHOLE loop map at a given state, by power
  iteration on Jacobian-vector products (see `jacobian_spectral_radius`).
- contraction ratios ‖h_{t+1} − h_t‖ / ‖h_t − h_{t−1}‖ per loop, measured on the actual trajectory.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mythos_dist import comm
from mythos_dist.model.attention import TokenLayout
from mythos_dist.model.dispatch import start_forward
from mythos_dist.model.rdt import RDT


def injection_radius(model: RDT) -> float:
    """ρ(A) of the injection: A is diagonal, so its spectral radius is exactly max |A_ii|."""
    return model.recurrent.injection.A().abs().max().item()


@dataclass
class RadiusEstimate:
    radius: float  # geometric-mean growth rate ‖J^k v‖^{1/k} over the trailing iterations
    rayleigh: float  # <v, Jv> for the last unit iterate v: signed λ when the dominant one is real
    norm_ratios: list[float]  # ‖J v_k‖ for each unit iterate v_k, in order


def jacobian_spectral_radius(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_iters: int = 30,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    rows: tuple[int, int, int] | None = None,
) -> RadiusEstimate:
    """Estimate ρ(J), J = ∂f/∂x at `x`, by power iteration on Jacobian-vector products.

    f maps a tensor to a tensor of the same shape (J is square over all its entries). Iterates are
    normalised every step; ‖J v_k‖ is the one-step growth. The estimate is the geometric mean of the
    growths over the second half of the iterations, i.e. (‖J^m v‖/‖v‖)^{1/m} after a burn-in, which
    tends to ρ(J) by Gelfand's formula for any J (also a complex-conjugate dominant pair, where the
    single-step ratio oscillates).

    mask (broadcastable to x, 0/1): iterate on the masked operator v ↦ mask ⊙ J(mask ⊙ v), i.e. the
    Jacobian restricted to the selected entries. With causal attention, padding after a sequence
    never feeds back into it (J is block-triangular), so masking the padding out gives exactly the
    radius of the part that matters, not of the padding's own dynamics.

    rows (first, stop, of): x holds rows [first, stop) of a state of `of` rows, the others on the
    other ranks of the process group, and f maps rows independently of the other ranks' (samples
    do not interact): every rank takes its rows of the same start vector, and norms and inner
    products are summed over the ranks (collective), so the iteration is the one over all rows.

    Limits: convergence is geometric in |λ_2|/|λ_1| and slow when the leading moduli are close.
    For non-normal J (the usual case: attention, MoE), single-step ratios can exceed ρ(J) — they are
    bounded by σ_max(J), not ρ(J) — and the transient growth decays only like O(log κ / m) in the
    exponent, so with few iterations the estimate is biased towards σ_max. It is the radius of the
    linearisation at this one state: discrete MoE routing is held fixed (the map is piecewise
    smooth), and a radius < 1 here implies local, not global, contraction.

    JVPs use the double-vjp trick on one recorded forward (u ↦ Jᵀu is linear, and its vjp is J v),
    which works through custom autograd Functions (the grouped expert GEMM) that lack a forward-mode
    rule. Attention runs on the math SDPA backend here: the fused kernels' backward is not itself
    differentiable.
    """
    _check_iters(n_iters)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        return _power_iteration(_retained_jvp(f, x), x, n_iters, seed, mask, rows)


def _check_iters(n_iters: int) -> None:
    if n_iters < 2:
        raise ValueError(f"n_iters must be ≥ 2, got {n_iters}")


def _retained_jvp(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable:
    """v ↦ J v at x by the double-vjp trick, on one recorded forward kept for every call."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    if y.shape != x.shape:
        raise ValueError(f"f must map a shape to itself for a square Jacobian: {x.shape} -> {y.shape}")
    u = torch.zeros_like(y, requires_grad=True)
    (jt_u,) = torch.autograd.grad(y, x, u, create_graph=True)  # Jᵀu, linear in u
    return lambda v: torch.autograd.grad(jt_u, u, v, retain_graph=True)[0]


def _blockwise_jvp(blocks: Sequence[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]) -> Callable:
    """v ↦ J v for a map that sends each block of rows (x_block, its map) to itself independently
    of the others, block by block: each block's forward is recorded anew per call and freed after
    it, so memory holds one block's graph, at one more forward and backward per block and call."""

    def jvp(v: torch.Tensor) -> torch.Tensor:
        out, first = [], 0
        for x_b, f_b in blocks:
            out.append(_retained_jvp(f_b, x_b)(v[first : first + x_b.shape[0]]))
            first += x_b.shape[0]
        return torch.cat(out)

    return jvp


def _power_iteration(
    jvp: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_iters: int,
    seed: int,
    mask: torch.Tensor | None,
    rows: tuple[int, int, int] | None,
) -> RadiusEstimate:
    """`jacobian_spectral_radius` for the operator v ↦ jvp(v) on x's shape (see there)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m = torch.ones_like(x) if mask is None else mask.to(x).expand_as(x)
    # drawn on the CPU, then moved: the same start vector on any device
    first, stop, of = rows if rows is not None else (0, x.shape[0], x.shape[0])
    v = torch.randn((of, *x.shape[1:]), generator=gen, dtype=torch.float32)[first:stop].to(x) * m
    v = v / _norm(v, rows is not None)
    ratios: list[float] = []
    rayleigh = float("nan")
    for _ in range(n_iters):
        jv = jvp(v) * m
        growth = _norm(jv, rows is not None).item()
        ratios.append(growth)
        rayleigh = _dot(v.flatten(), jv.flatten(), rows is not None).item()
        if growth == 0 or not math.isfinite(growth):
            break
        v = (jv / growth).detach()
    tail = ratios[len(ratios) // 2 :]
    radius = 0.0 if min(tail) == 0 else math.exp(sum(math.log(r) for r in tail) / len(tail))
    return RadiusEstimate(radius, rayleigh, ratios)


def contraction_ratios(delta_norms: list[torch.Tensor], across_ranks: bool = False) -> list[float]:
    """‖h_{t+1} − h_t‖ / ‖h_t − h_{t−1}‖ for t = 1 .. n−1, norms over the whole state.

    delta_norms: per loop, ‖h_t − h_{t−1}‖ per position (B, T) as RDTOutput.delta_norms gives them;
    they are combined into one Frobenius norm per loop (across_ranks: over every rank's rows,
    collective). Length n_loops − 1.
    """
    total = [_frobenius(d.float(), across_ranks) for d in delta_norms]
    return [b / a if a > 0 else float("inf") for a, b in itertools.pairwise(total)]


def _norm(x: torch.Tensor, across_ranks: bool) -> torch.Tensor:
    """‖x‖; across_ranks: of every rank's x together (collective, summed in fp64)."""
    if not across_ranks:
        return x.norm()
    return comm.all_reduce_host(x.detach().double().square().sum().cpu().reshape(1))[0].sqrt()


def _frobenius(x: torch.Tensor, across_ranks: bool) -> float:
    return (_norm(x, True) if across_ranks else x.square().sum().sqrt()).item()


def _dot(a: torch.Tensor, b: torch.Tensor, across_ranks: bool) -> torch.Tensor:
    if not across_ranks:
        return a @ b
    return comm.all_reduce_host((a.detach().double() @ b.detach().double()).cpu().reshape(1))[0]


@torch.no_grad()
def loop_state(
    model: RDT, ids_BT: torch.Tensor, n_loops: int
) -> tuple[torch.Tensor, torch.Tensor, list, Callable[..., torch.Tensor]]:
    """(h after n_loops, e, per-loop delta norms (B,T), the loop map (h, t) ↦ f_t(h, e)) without
    ACT mixing: the raw recurrence. h and e are rows (B·T, D) of every token; the map also takes
    `samples` (a range of sample indices): then h holds only those samples' rows."""
    B, T = ids_BT.shape
    layout = TokenLayout(B, T)
    x = model.embed(ids_BT.flatten())
    rope = model.rope(0, T, x.device, x.dtype)
    for layer in model.prelude:
        x, _ = layer(x, layout, rope, None, "prelude")

    def f(h: torch.Tensor, t: int, samples: range = range(B)) -> torch.Tensor:
        e = x[samples.start * T : samples.stop * T]
        start_forward(model)  # outside model.forward: a padded all-to-all's token counts change
        return model.recurrent.step(h, e, t, rope, TokenLayout(len(samples), T))[0]

    h, deltas = x, []
    for t in range(n_loops):
        h_next = f(h, t)
        deltas.append((h_next - h).float().norm(dim=-1).view(B, T))
        h = h_next
    return h, x, deltas, f


def spectral_report(
    model: RDT,
    ids_BT: torch.Tensor,
    n_loops: int,
    valid_BT: torch.Tensor | None = None,
    n_iters: int = 30,
    across_ranks: bool = False,
    batch_size: int | None = None,
) -> dict:
    """ρ(A), Jacobian radius of h ↦ f(h, e) at h_{n_loops} (map index t = n_loops, the next loop
    to run: what governs extrapolation to more loops) and the per-loop contraction ratios.

    valid_BT: positions that count (False for right padding); default all.
    across_ranks: collective (every rank passes the same inputs, e.g. an expert-parallel model):
    each rank runs its contiguous share of the samples and norms are summed over the ranks, the
    same numbers as one process over all samples (up to summation order) at 1/world of the
    activations. With fewer samples than ranks every rank runs all of them.
    batch_size: the Jacobian-vector products run on blocks of at most this many samples, each
    block's graph recorded anew per power iteration (memory of one block's graph, not all
    samples', at 5-6× the time measured in docs/scale.md); None: all at once, one graph kept.
    """
    if n_loops < 1:
        raise ValueError(f"n_loops must be ≥ 1, got {n_loops}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    _check_iters(n_iters)
    B, T = ids_BT.shape
    world = comm.world_size() if across_ranks else 1
    across_ranks = across_ranks and 1 < world <= B
    rows = None
    shares = [(r * B // world, (r + 1) * B // world) for r in range(world)] if across_ranks else [(0, B)]
    if across_ranks:
        lo, hi = shares[comm.rank()]
        ids_BT = ids_BT[lo:hi]
        valid_BT = None if valid_BT is None else valid_BT[lo:hi]
        rows = (lo * T, hi * T, B * T)  # the loop state's rows are (sample, position)
    # Every rank cuts its share into the same number of blocks (the forwards are collective under
    # expert parallelism), none empty: shares differ by at most one sample.
    smallest, largest = min(b - a for a, b in shares), max(b - a for a, b in shares)
    n_blocks = min(math.ceil(largest / (batch_size or largest)), smallest)
    own = ids_BT.shape[0]
    cuts = [own * i // n_blocks for i in range(n_blocks + 1)]
    was_training = model.training
    model.eval()  # no dropout, no router load accounting
    try:
        h, _, deltas, f = loop_state(model, ids_BT, n_loops)
        if valid_BT is not None:
            deltas = [d * valid_BT for d in deltas]
        mask = None if valid_BT is None else valid_BT.reshape(-1, 1)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            if n_blocks == 1:  # one graph, kept for every iteration
                jvp = _retained_jvp(lambda s: f(s, n_loops), h)
            else:
                blocks = [(h[a * T : b * T], functools.partial(f, t=n_loops, samples=range(a, b)))
                          for a, b in itertools.pairwise(cuts)]  # fmt: skip
                jvp = _blockwise_jvp(blocks)
            est = _power_iteration(jvp, h, n_iters, 0, mask, rows)
    finally:
        model.train(was_training)
    return {
        "rho_A": injection_radius(model),
        "jacobian_radius": est.radius,
        "jacobian_rayleigh": est.rayleigh,
        "jacobian_norm_ratios": est.norm_ratios,
        "contraction_ratios": contraction_ratios(deltas, across_ranks),
        "delta_norms": [_frobenius(d, across_ranks) for d in deltas],
        "n_loops": n_loops,
        "blocks": n_blocks,  # of samples per rank in the Jacobian-vector products
    }
