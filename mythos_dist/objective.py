"""The training objective and answer predictions, shared by training and evaluation.

A batch (see data_pipeline.loader) holds `input_ids` (B,T) right-padded, `loss_mask` (B,T) True
only at the EQ position, and `answer` (B,). Only the answer position's logits are needed: the
forward skips padding in the FFN/MoE and runs the head at that position alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from mythos_dist.config import Config, ModelConfig
from mythos_dist.model import RDT, LoopHalting, RDTOutput


def answer_positions(loss_mask_BT: torch.Tensor) -> torch.Tensor:
    """(B,) index of the single loss position per row (the EQ token)."""
    return loss_mask_BT.to(torch.uint8).argmax(dim=1)


def valid_positions(loss_mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) True up to and including the answer position: the only tokens whose outputs can
    matter to it (attention is causal, so right padding after EQ never feeds back)."""
    pos_B = answer_positions(loss_mask_BT)
    return torch.arange(loss_mask_BT.shape[1], device=loss_mask_BT.device)[None, :] <= pos_B[:, None]


def answer_forward(
    model: RDT,
    batch: Mapping[str, torch.Tensor],
    n_loops: int,
    loops_out: Iterable[int] = (),
    backprop_loops: int = 0,
    track_deltas: bool = False,
    halting: LoopHalting | None = None,
) -> RDTOutput:
    """Forward whose `logits` / `loop_logits` are (B, V) at the answer position (halting: each
    sample stops once converged, n_loops is the cap)."""
    return model(
        batch["input_ids"],
        n_loops=n_loops,
        loops_out=loops_out,
        backprop_loops=backprop_loops,
        track_deltas=track_deltas,
        valid_BT=valid_positions(batch["loss_mask"]),
        logits_at_B=answer_positions(batch["loss_mask"]),
        halting=halting,
    )


def curriculum_cap(cfg: Config, step: int) -> int | None:
    """The length curriculum's longest chain at this step (None = off): linear from the shortest
    train length + 1 to the longest over train.length_curriculum_steps, then the longest."""
    (lo, hi), steps = cfg.data.task.train_lengths, cfg.train.length_curriculum_steps
    return min(hi, lo + 1 + (hi - lo - 1) * step // steps) if steps else None


def longest_counted(cfg: Config, step: int, n_loops: int, attn_window: int | None = None) -> int | None:
    """The longest chain that counts in the loss at this step, loop count and attention window
    (None = the model's) (returns None = every chain): the curriculum's cap, and with
    train.reachable_only the answer position's receptive field (a chain of n digits puts its first
    digit n tokens before EQ)."""
    caps = [
        curriculum_cap(cfg, step),
        cfg.model.receptive_field(n_loops, attn_window) if cfg.train.reachable_only else None,
    ]
    caps = [c for c in caps if c is not None]
    return min(caps) if caps else None


def loss_and_metrics(
    out: RDTOutput, batch: Mapping[str, torch.Tensor], cfg: ModelConfig, longest: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy at the answer position + MoE aux loss + ACT ponder cost (when enabled).

    longest: only chains of at most this many digits count in the cross-entropy and accuracy
    (None = all). A batch with none counted gives a zero cross-entropy that is still part of the
    graph, so every rank runs the same backward.
    """
    answer = batch["answer"]
    logits = out.logits.float()
    if longest is None:  # torch's mean reduction: bit-for-bit the loss before chains could be masked
        ce = F.cross_entropy(logits, answer)
        w_B = torch.ones_like(answer, dtype=logits.dtype)
    else:
        w_B = (batch["length"] <= longest).to(logits.dtype)
        ce = (F.cross_entropy(logits, answer, reduction="none") * w_B).sum() / w_B.sum().clamp_min(1)
    n = w_B.sum()
    loss = ce + out.aux_loss
    if cfg.act_enabled:
        loss = loss + cfg.act_ponder_coef * out.ponder_cost
    correct = ((out.logits.argmax(-1) == answer).to(w_B.dtype) * w_B).sum()
    metrics = {
        "loss": loss.detach(),
        "ce": ce.detach(),
        "correct": correct,
        "n": n,
        "aux_loss": out.aux_loss.detach(),
    }
    if cfg.act_enabled:
        metrics["ponder"] = out.ponder_cost.detach()
    return loss, metrics
