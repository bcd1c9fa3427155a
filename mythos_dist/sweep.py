"""The loop sweep: accuracy at every requested loop count from one forward per batch, and
optionally at the loop count each sample picks itself (`LoopHalting`, eval.auto).

Sample i of a split is the same on any number of ranks (`data_pipeline.digit_chain.generate` is a
pure function of the index), so `chain_batches` of a range gives the same batches anywhere. The
samples are those of the held-out set cfg.eval.heldout ('test' unless choosing on 'val').
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.batch import Batch, chains_batch
from mythos_dist.config import Config, ConfigError
from mythos_dist.model.rdt import RDT
from mythos_dist.model.recurrent import LoopHalting
from mythos_dist.objective import answer_forward, answer_positions, valid_positions


def parse_loops(spec: str | Sequence[Any]) -> tuple[int, ...]:
    """'1,2,4' or a sequence -> sorted unique loop counts; each must be an integer ≥ 1."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else None
        if text is not None and text.isascii() and text.isdigit():
            item = int(text)
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ConfigError(f"loop counts must be integers ≥ 1, got {item!r}")
        out.append(item)
    if not out:
        raise ConfigError("need at least one loop count")
    return tuple(sorted(set(out)))


def parse_loop_spec(spec: str) -> tuple[tuple[int, ...] | None, bool]:
    """`--loops`: '1,2,4', 'auto' or '4,8,auto' -> (fixed counts or None for the config's, auto?)."""
    items = [x.strip() for x in spec.split(",")]
    auto = "auto" in items
    fixed = [x for x in items if x != "auto"]
    return (parse_loops(",".join(fixed)) if fixed else None), auto


def check_splits(cfg: Config, splits: Sequence[str]) -> tuple[str, ...]:
    known = cfg.data.task.eval_splits
    unknown = [s for s in splits if s not in known]
    if unknown or not splits:
        raise ConfigError(f"eval splits: unknown {unknown or '(none given)'}; configured: {sorted(known)}")
    return tuple(dict.fromkeys(splits))


def chain_batches(cfg: Config, split: str, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
    """Samples [start, stop) of `split` in the loader's batch format, batch starts on multiples of
    batch_size (relative to `start`); the width is the split's longest input, for every batch."""
    from data_pipeline.digit_chain import generate

    for lo in range(start, stop, batch_size):
        yield chains_batch(
            generate(cfg.data.task, split, lo, min(lo + batch_size, stop), heldout=cfg.eval.heldout)
        )


def spectral_inputs(cfg: Config, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stability tools' inputs: the first min(n, 64) samples of `split` (n defaults to the
    split size) -> (input_ids (B,T), valid positions (B,T))."""
    batch = next(chain_batches(cfg, split, 0, min(64, cfg.data.task.n_eval if n is None else n), 64))
    return batch["input_ids"], valid_positions(batch["loss_mask"])


@dataclass
class SweepResult:
    """Per-sample results, rows in batch order."""

    prediction_NL: np.ndarray  # argmax token at the EQ position, per loop count in `loops`
    correct_NL: np.ndarray  # bool
    length_N: np.ndarray
    answer_N: np.ndarray
    sample_id_N: np.ndarray
    delta_NM: np.ndarray  # ‖h_t − h_{t−1}‖ at the EQ position for t = 1..max(loops)
    auto_prediction_N: np.ndarray | None = None  # with halting: prediction at the sample's own count
    auto_loops_N: np.ndarray | None = None  # loops it used


@torch.no_grad()
def sweep(
    model: RDT,
    batches: Iterable[Batch],
    loops: Sequence[int],
    halting: LoopHalting | None = None,
    halting_cap: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> SweepResult:
    """All loop counts from ONE forward per batch (the recurrence runs max(loops) times and the coda
    is applied to the state after each requested count), predictions read at the EQ position.
    halting: a second forward per batch in which each sample stops once converged, at most
    halting_cap loops (its prediction and loops used). on_batch(samples in it): after each batch."""
    loops = sorted(loops)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[tuple[np.ndarray, ...]] = []
    try:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            if not bool((b["loss_mask"].sum(1) == 1).all()):
                raise ValueError("each sample's loss_mask must mark exactly one (the EQ) position")
            pos_B = answer_positions(b["loss_mask"])
            rows_B = torch.arange(len(pos_B), device=device)
            out = answer_forward(model, b, loops[-1], loops_out=loops, track_deltas=True)
            pred_BL = torch.stack([out.loop_logits[n].argmax(-1) for n in loops], 1)
            delta_BM = torch.stack([d[rows_B, pos_B] for d in out.delta_norms], 1)
            answer_B = b["answer"]
            fields = (pred_BL, pred_BL == answer_B[:, None], b["length"], answer_B, b["sample_id"], delta_BM)
            if halting is not None:
                auto = answer_forward(model, b, halting_cap, halting=halting)
                fields += (auto.logits.argmax(-1), auto.loops_used)
            parts.append(tuple(t.cpu().numpy() for t in fields))
            if on_batch is not None:
                on_batch(len(pos_B))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("sweep got no batches")
    cols = [np.concatenate(c) for c in zip(*parts)]
    auto = (cols[6].astype(np.int16), cols[7].astype(np.int16)) if halting is not None else (None, None)
    return SweepResult(cols[0].astype(np.int16), cols[1], *cols[2:5], cols[5].astype(np.float32), *auto)
