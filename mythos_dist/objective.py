"""The training objective and answer predictions, shared by training and evaluation.

A batch (see data_pipeline.loader) holds `input_ids` (B,T) right-padded, `loss_mask` (B,T) True
only at the EQ position, and `answer` (B,). Only the answer position's logits are needed: the
forward skips padding in the FFN/MoE and runs the head at that position alone. A recipe may add
the running-sum loss (train.running_sum_loss), which reads the logits at every digit as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from data_pipeline.digit_chain import N_DIGITS
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
    all_positions: bool = False,
) -> RDTOutput:
    """Forward whose `logits` / `loop_logits` are (B, V) at the answer position (halting: each
    sample stops once converged, n_loops is the cap); all_positions: (B, T, V) at every position
    up to the answer (0 after it), for the running-sum loss."""
    return model(
        batch["input_ids"],
        n_loops=n_loops,
        loops_out=loops_out,
        backprop_loops=backprop_loops,
        track_deltas=track_deltas,
        valid_BT=valid_positions(batch["loss_mask"]),
        logits_at_B=None if all_positions else answer_positions(batch["loss_mask"]),
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


def running_sum_ce(
    logits_BTV: torch.Tensor, ids_BT: torch.Tensor, modulus: int, longest: int | None
) -> torch.Tensor:
    """Cross-entropy of the running sum at every digit: the logits at digit j against
    (d_1 + … + d_j) mod modulus, the answer of the chain's prefix up to j. Only prefixes of at
    most `longest` digits count (None = all), as for whole chains in loss_and_metrics."""
    is_digit_BT = ids_BT < N_DIGITS  # EQ and PAD are not digits
    target_BT = torch.where(is_digit_BT, ids_BT, 0).cumsum(1) % modulus
    w_BT = is_digit_BT
    if longest is not None:  # the prefix ending at column j has j + 1 digits
        w_BT = w_BT & (torch.arange(ids_BT.shape[1], device=ids_BT.device) < longest)[None, :]
    ce_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), target_BT.flatten(), reduction="none")
    w = w_BT.flatten().to(ce_BT.dtype)
    return (ce_BT * w).sum() / w.sum().clamp_min(1)


def loss_and_metrics(
    out: RDTOutput,
    batch: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    longest: int | None = None,
    running_sum_weight: float = 0.0,
    modulus: int = 7,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy at the answer position + MoE aux loss + ACT ponder cost (when enabled), plus
    running_sum_weight × running_sum_ce when out.logits is (B, T, V) (answer_forward with
    all_positions).

    longest: only chains of at most this many digits count in the cross-entropy and accuracy
    (None = all). A batch with none counted gives a zero cross-entropy that is still part of the
    graph, so every rank runs the same backward.
    """
    answer = batch["answer"]
    logits_all = None
    if out.logits.dim() == 3:
        logits_all = out.logits
        pos_B = answer_positions(batch["loss_mask"])
        out_logits = logits_all[torch.arange(len(pos_B), device=pos_B.device), pos_B]
    else:
        out_logits = out.logits
    logits = out_logits.float()
    if longest is None:  # torch's mean reduction: bit-for-bit the loss before chains could be masked
        ce = F.cross_entropy(logits, answer)
        w_B = torch.ones_like(answer, dtype=logits.dtype)
    else:
        w_B = (batch["length"] <= longest).to(logits.dtype)
        ce = (F.cross_entropy(logits, answer, reduction="none") * w_B).sum() / w_B.sum().clamp_min(1)
    n = w_B.sum()
    loss = ce + out.aux_loss
    if logits_all is not None and running_sum_weight:
        rs_ce = running_sum_ce(logits_all, batch["input_ids"], modulus, longest)
        loss = loss + running_sum_weight * rs_ce
    if cfg.act_enabled:
        loss = loss + cfg.act_ponder_coef * out.ponder_cost
    correct = ((logits.argmax(-1) == answer).to(w_B.dtype) * w_B).sum()
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
