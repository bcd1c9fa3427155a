"""The metrics processor of training: turns each `StepResult` into the progress line (step, loss,
throughput, ETA), the MLflow metrics and the divergence warning. Rank 0 prints and tracks; the
collectives here (tokens, longest chain) run on every rank at the same log steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mythos_dist.comm import all_reduce_host
from mythos_dist.config import TrainConfig
from mythos_dist.stability import injection_radius
from mythos_dist.tracking import Tracker

if TYPE_CHECKING:
    from mythos_dist.train import StepResult


def loop_divergence(delta_norms: list[float]) -> str | None:
    """Why the hidden state looks divergent across loops, or None.

    delta_norms: ‖h_t − h_{t−1}‖ per loop. Divergent: any is non-finite, or it grew over each of the
    last two loops (a contractive recurrence shrinks its steps; growth there means extrapolating to
    more loops will blow up).
    """
    shown = ", ".join(f"{d:.3g}" for d in delta_norms[-3:])
    if not all(math.isfinite(d) for d in delta_norms):
        return f"‖h_t − h_t-1‖ is non-finite (last loops: {shown})"
    last = delta_norms[-3:]
    if len(last) == 3 and last[0] < last[1] < last[2]:
        return f"‖h_t − h_t-1‖ grows over the last loops ({shown})"
    return None


def fmt_time(s: float) -> str:
    """Seconds as H:MM:SS (progress lines)."""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StepMetrics:
    """Consumes the results of steps start+1..end of this launch, in order."""

    def __init__(self, t: TrainConfig, tracker: Tracker, say: Callable[..., None], start: int, end: int):
        self.t, self.tracker, self.say, self.start, self.end = t, tracker, say, start, end
        self.t0 = time.perf_counter()
        self.tokens = 0  # this rank's valid tokens, this launch
        self.diverging = False  # the hidden state looked divergent at the previous log step

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, res: StepResult, in_row: int, n_skipped: int) -> None:
        """Every step: count its tokens; a skipped step is reported when it happens."""
        self.tokens += res.tokens
        if res.skipped:
            n_micro = self.t.grad_accum_steps * dist.get_world_size()
            self.say(
                f"step {res.step}: non-finite loss or gradient ({res.n_nonfinite} of {n_micro} "
                f"micro batches with a non-finite loss), update skipped ({in_row} in a row)"
            )
            self.tracker.log_metrics({"nonfinite_steps": n_skipped}, step=res.step)

    def log(self, res: StepResult, engine: Any, n_skipped: int) -> tuple[int, float, float]:
        """A log step (collective): print and track; -> (tokens of all ranks, tokens/s, seconds)."""
        elapsed = self.elapsed()
        all_tokens = int(all_reduce_host(torch.tensor([self.tokens], dtype=torch.float64)).item())
        tok_s = all_tokens / elapsed
        metrics = {
            "loss": res.loss,
            "ce": res.ce,
            "acc": res.acc,
            "lr": engine.get_lr()[0],
            "grad_norm": res.grad_norm,
            "tokens_per_s": tok_s,
            "n_loops": res.choice.n_loops,
            "rho_A": injection_radius(engine.module),
            "nonfinite_steps": n_skipped,
        }
        if res.longest is not None:  # the loss counted only chains this long (curriculum / reach)
            metrics["longest_counted"] = res.longest
        if res.choice.attn_window is not None:
            metrics["attn_window"] = res.choice.attn_window
        longest_S = all_reduce_host(torch.tensor([res.longest_chain]), dist.ReduceOp.MAX)
        metrics["longest_chain"] = longest_S.item()  # the longest chain trained on this step
        deltas = res.deltas or []
        if len(deltas) >= 2:
            metrics["loop/delta_last"] = deltas[-1]
            metrics["loop/delta_growth"] = deltas[-1] / deltas[-2] if deltas[-2] > 0 else math.inf
        why = loop_divergence(deltas)
        metrics["loop/diverging"] = float(why is not None)
        if why is not None and not self.diverging:  # warn when it starts, not at every log step
            self.say(f"warning: step {res.step}: hidden state diverging across loops: {why}")
        self.diverging = why is not None
        for i, load_E in enumerate(res.loads):  # expert load balance per MoE layer
            load_E = load_E.double()
            metrics[f"moe{i}/load_max_over_mean"] = (load_E.max() / load_E.mean()).item()
            metrics[f"moe{i}/load_cv"] = (load_E.std() / load_E.mean()).item()
        eta = elapsed / (res.step - self.start) * (self.end - res.step)
        self.say(
            f"step {res.step}/{self.t.steps}  loss {res.loss:.4f}  acc {res.acc:.3f}  lr {metrics['lr']:.2e}  "
            f"gnorm {res.grad_norm:.3f}  loops {res.choice.n_loops}  tok/s {tok_s:,.0f}  eta {fmt_time(eta)}"
        )
        self.tracker.log_metrics(metrics, step=res.step)
        return all_tokens, tok_s, elapsed
