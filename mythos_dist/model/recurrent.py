"""The looped block: h_{t+1} = A·h_t + B·e + Block(norm(h_t + e) + s_t), plus loop policies.

A is diagonal with entries exp(-exp(log_dt + log_A)) ∈ (0, 1), so ρ(A) < 1 by construction.
ACT halting is optional and off by default; when on, every position runs every loop (no early
exit, which would desynchronise expert-parallel ranks) and the output is the ACT-weighted mixture.
Inference can instead stop each sample once its state has converged (`LoopHalting`): a stopped
sample's state is frozen, so its output is exactly that of a fixed count equal to its loops used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mythos_dist.model.attention import GQAttention, KVCache, MLAttention, Rope, TokenLayout
from mythos_dist.model.block import TransformerBlock
from mythos_dist.model.config import LoopPolicyConfig, ModelConfig
from mythos_dist.model.moe import load_counting_paused
from mythos_dist.model.norm import RMSNorm


class LTIInjection(nn.Module):
    # exp(-exp(-12)) = 1 - 6e-6 is still < 1 in fp32; a lower clamp would round A to exactly 1.
    LOG_RATE_RANGE = (-12.0, 12.0)

    def __init__(self, dim: int):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.full((dim,), 0.1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.log_A)
        nn.init.zeros_(self.log_dt)
        nn.init.constant_(self.B, 0.1)

    def A(self) -> torch.Tensor:
        """Diagonal of A in fp32, every entry in (0, 1)."""
        return torch.exp(-torch.exp((self.log_dt + self.log_A).float().clamp(*self.LOG_RATE_RANGE)))

    def forward(self, h: torch.Tensor, e: torch.Tensor, block_out: torch.Tensor) -> torch.Tensor:
        return (self.A() * h + self.B * e).to(h.dtype) + block_out


def loop_signal(
    t: int, dim: int, device: torch.device, dtype: torch.dtype, theta: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal loop-index signal on the first dim/8 channels (zeros elsewhere), shape (dim,)."""
    n = max(2, dim // 8 // 2 * 2)
    freqs = theta ** (-torch.arange(0, n, 2, device=device, dtype=torch.float32) / n)
    sig = torch.zeros(dim, device=device, dtype=torch.float32)
    sig[:n] = torch.cat([(t * freqs).sin(), (t * freqs).cos()])
    return sig.to(dtype)


class DepthLoRA(nn.Module):
    """delta(x, t) = (down(x) ⊙ scale[t]) @ up; t clamped to the trained table past its end."""

    def __init__(self, dim: int, rank: int, n_loops: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Parameter(torch.zeros(rank, dim))  # zero: starts as an exact no-op
        self.scale = nn.Parameter(torch.ones(n_loops, rank))

    def reset_parameters(self) -> None:
        """The constants; `down` is a Linear, initialised with the model's matrices."""
        nn.init.zeros_(self.up)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        s = self.scale[min(t, self.scale.shape[0] - 1)]
        return (self.down(x) * s) @ self.up


@dataclass(frozen=True)
class LoopHalting:
    """Inference that picks its own loop count per sample: a sample stops after loop t (≥ min_loops)
    once max over its tokens of ‖h_t − h_{t−1}‖ / ‖h_t‖ < threshold, or at the forward's n_loops
    (the cap). A stopped sample's rows keep their state (they still pass through the block, so
    shapes and collectives stay the same on every rank) until every sample is done.

    all_done(local) -> bool: whether every sample everywhere has stopped, given whether this
    process's have. Under expert parallelism every rank must run the same loops (each loop's MoE
    is an all-to-all), so the caller passes a reduction over the group; alone, the identity.
    """

    threshold: float = 0.01
    min_loops: int = 1
    all_done: Callable[[bool], bool] = lambda local: local

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ValueError(f"halting threshold must be a finite number > 0, got {self.threshold!r}")
        if self.min_loops < 1:
            raise ValueError(f"halting min_loops must be ≥ 1, got {self.min_loops}")


@dataclass
class LoopResult:
    outputs: dict[int, torch.Tensor]  # loop count -> state handed to the coda after that many loops
    aux_loss: torch.Tensor  # MoE aux loss, mean over the loops (per token per layer use)
    ponder_cost: torch.Tensor  # ACT: mean (steps + remainder); 0 without ACT
    delta_norms: list[torch.Tensor] = field(default_factory=list)  # ‖h_t − h_{t−1}‖ per loop and row (N,)
    loops_used_B: torch.Tensor | None = None  # with halting: loops each sample ran (int64, (B,))
    loops_run: int = 0  # iterations of the block that ran (with halting: ≥ every sample's count)


class RecurrentBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.block = TransformerBlock(cfg, moe=True)
        self.injection = LTIInjection(cfg.dim)
        self.lora = DepthLoRA(cfg.dim, cfg.lora_rank, cfg.max_loop_iters) if cfg.lora_rank > 0 else None
        self.halt = nn.Linear(cfg.dim, 1) if cfg.act_enabled else None
        # Activation checkpointing of each loop iteration (set from outside, train.activation_checkpointing).
        self.checkpoint_loops = False

    def step(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        t: int,
        rope: Rope,
        layout: TokenLayout,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One application of the loop map f(h, e) at loop index t (0-based) to rows (N, D) placed
        by `layout`. -> (h_next, aux)."""
        x = self.norm(h + e)
        if self.cfg.loop_signal:
            x = x + loop_signal(t, x.shape[-1], x.device, x.dtype)
        out, aux = self.block(x, layout, rope, cache, f"loop{t}")
        if self.lora is not None:
            out = out + self.lora(out, t)
        return self.injection(h, e, out), aux

    def _recompute_context(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """For torch's checkpoint, called at forward: the recomputation in backward sees the attention
        windows of the forward (`attention_window` may set them around the forward only), and the
        routers do not count the same tokens' load again."""
        layers = [m for m in self.block.modules() if isinstance(m, (GQAttention, MLAttention))]
        forward_windows = [m.window for m in layers]

        @contextmanager
        def as_in_forward() -> Iterator[None]:
            now = [m.window for m in layers]
            for m, w in zip(layers, forward_windows):
                m.window = w
            try:
                with load_counting_paused(self.block):
                    yield
            finally:
                for m, w in zip(layers, now):
                    m.window = w

        return nullcontext(), as_in_forward()

    def forward(
        self,
        e: torch.Tensor,
        n_loops: int,
        rope: Rope,
        layout: TokenLayout,
        cache: KVCache | None = None,
        emit_at: Iterable[int] = (),
        backprop_loops: int = 0,
        track_deltas: bool = False,
        halting: LoopHalting | None = None,
    ) -> LoopResult:
        """Run n_loops iterations from h_0 = e (rows (N, D) placed by `layout`).

        emit_at: extra loop counts (≤ n_loops) whose output is also returned — the same values a
        separate forward with that many loops gives (for ACT: the remainder goes to that step).
        backprop_loops k > 0: gradients flow only through the last k loops (truncated BPTT).
        halting: stop each sample when its state has converged (n_loops is then the cap); the
        output is outputs[n_loops], each sample's state after its own loops_used_B.

        One function on purpose: the loop, its gradient truncation, ACT halting and the emitted
        loop counts interact at every iteration, and the reader should see them together.
        """
        if n_loops < 1:
            raise ValueError(f"n_loops must be ≥ 1, got {n_loops}")
        if halting is not None:
            if self.halt is not None or set(emit_at) - {n_loops} or backprop_loops or torch.is_grad_enabled():
                raise ValueError("halting is for inference: no ACT, emit_at, backprop_loops or gradients")
            return self._forward_halting(e, n_loops, rope, layout, cache, track_deltas, halting)
        emit = {n for n in emit_at if n <= n_loops} | {n_loops}
        h = e
        result = LoopResult({}, e.new_zeros(()), e.new_zeros(()))
        act = self.halt is not None
        if act:
            acc = torch.zeros_like(h)
            cum = h.new_zeros(h.shape[:-1])
            halted = torch.zeros_like(cum, dtype=torch.bool)
            steps = torch.zeros_like(cum)
            remainder = torch.zeros_like(cum)
        first_grad_loop = n_loops - backprop_loops if backprop_loops > 0 else 0
        for t in range(n_loops):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad_loop):
                if self.checkpoint_loops and torch.is_grad_enabled() and cache is None:
                    # Only the iteration's inputs are kept; backward runs it again (the same
                    # collectives in the same order on every rank) as it ran in the forward.
                    h_next, aux = checkpoint(
                        self.step, h, e, t, rope, layout, use_reentrant=False, context_fn=self._recompute_context
                    )  # fmt: skip
                else:
                    h_next, aux = self.step(h, e, t, rope, layout, cache)
            # Mean, not sum: the aux loss's weight must not change with the (sampled) loop count.
            result.aux_loss = result.aux_loss + aux / n_loops
            if track_deltas:
                result.delta_norms.append((h_next - h).detach().float().norm(dim=-1))
            h = h_next
            n = t + 1
            if not act:
                if n in emit:
                    result.outputs[n] = h
                continue
            running = (~halted).to(h.dtype)
            last_w = running * (1 - cum)  # weight if this were the final loop
            if n in emit:
                result.outputs[n] = acc + last_w.unsqueeze(-1) * h
            if n == n_loops:
                steps, remainder = steps + running, remainder + last_w
                break
            p = torch.sigmoid(self.halt(h)).squeeze(-1).to(h.dtype)
            over = cum + p >= self.cfg.act_threshold
            w = running * torch.where(over, 1 - cum, p)
            acc = acc + w.unsqueeze(-1) * h
            steps = steps + running
            remainder = remainder + torch.where(over, w, torch.zeros_like(w))
            cum = cum + w
            halted = halted | over
        if act:
            result.ponder_cost = (steps + remainder).mean()
        return result

    def _forward_halting(
        self,
        e: torch.Tensor,
        n_loops: int,
        rope: Rope,
        layout: TokenLayout,
        cache: KVCache | None,
        track_deltas: bool,
        halting: LoopHalting,
    ) -> LoopResult:
        """`forward` with per-sample halting (see LoopHalting)."""
        rows_N = (
            layout.rows_N if layout.rows_N is not None else torch.arange(layout.B * layout.T, device=e.device)
        )
        sample_N = rows_N // layout.T
        running_B = torch.zeros(layout.B, dtype=torch.bool, device=e.device)
        running_B[sample_N] = True  # a sample without rows has nothing to compute
        used_B = torch.zeros(layout.B, dtype=torch.int64, device=e.device)
        # A decode step with a filled cache must add an entry for every cached loop iteration.
        may_stop_early = cache is None or cache.n_loops is None
        h = e
        result = LoopResult({}, e.new_zeros(()), e.new_zeros(()))
        for t in range(n_loops):
            h_next, aux = self.step(h, e, t, rope, layout, cache)
            result.aux_loss = result.aux_loss + aux / n_loops
            delta_N = (h_next - h).float().norm(dim=-1)
            if track_deltas:
                result.delta_norms.append(torch.where(running_B[sample_N], delta_N, 0.0))
            rel_N = delta_N / h_next.float().norm(dim=-1).clamp_min(1e-30)
            rel_B = torch.zeros(layout.B, device=e.device).scatter_reduce(0, sample_N, rel_N, "amax")
            h = torch.where(running_B[sample_N, None], h_next, h)
            used_B = used_B + running_B.long()
            if t + 1 >= halting.min_loops:
                running_B = running_B & ~(rel_B < halting.threshold)
            result.loops_run = t + 1
            if may_stop_early and t + 1 < n_loops and halting.all_done(not bool(running_B.any())):
                break
        result.outputs[n_loops] = h
        result.loops_used_B = used_B
        return result


# --------------------------------------------------------------------------- training loop policies


@dataclass(frozen=True)
class LoopChoice:
    n_loops: int
    backprop_loops: int  # 0 = through all loops
    attn_window: int | None = None  # None = the model's own


class LoopPolicy:
    """Loop count (and attention window, when windows are given) per training step, a pure function
    of (seed, step): every rank draws the same without communication, and a resumed run draws what
    the uninterrupted run would have."""

    def __init__(
        self, cfg: LoopPolicyConfig, seed: int, attn_windows: Sequence[int] = (), windows_until: int = 0
    ):
        self.cfg, self.seed, self.attn_windows = cfg, seed, tuple(attn_windows)
        self.windows_until = windows_until  # from this step on: the model's window (0: never)

    def __call__(self, step: int) -> LoopChoice:
        c = self.cfg
        rng = np.random.default_rng([self.seed, step])
        if c.kind == "fixed":
            n = c.n_loops
        elif c.kind == "uniform":
            n = int(rng.integers(c.min_loops, c.max_loops + 1))
        elif c.kind == "choice":
            n = c.counts[int(rng.integers(len(c.counts)))]
        else:  # Huginn: τ ~ N(log(r̄−1) − σ²/2, σ), n ~ Poisson(e^τ) + 1, so E[n] = r̄ before clipping
            tau = rng.normal(math.log(max(c.n_loops - 1, 1e-3)) - c.sigma**2 / 2, c.sigma)
            n = int(rng.poisson(math.exp(tau))) + 1
        if c.kind in ("uniform", "poisson_lognormal"):
            n = min(max(n, c.min_loops), c.max_loops)
        window = None
        drawing = self.attn_windows and not (self.windows_until and step >= self.windows_until)
        if drawing:  # its own stream: adding windows leaves the loop counts unchanged
            window = self.attn_windows[
                np.random.default_rng([self.seed, step, 1]).integers(len(self.attn_windows))
            ]
        return LoopChoice(n, min(c.backprop_loops, n), window)
