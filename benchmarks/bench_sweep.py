"""Cost of the one-pass loop sweep vs one forward per loop count, measured side by side.

The one-pass sweep runs the recurrence max(loops) times and the coda once per count; separate
forwards rerun prelude and recurrence for every count: Σ loops = 21 vs 8 block applications for
loops 1,2,4,6,8. Both arms get the same inputs (a digit-chain eval batch) and the same model
options, and alternate within each repetition so machine load affects them alike.
A second baseline is the naive one: full-width separate forwards without padding skipping.

    python benchmarks/bench_sweep.py [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mythos_dist.config import Config, ModelConfig
from mythos_dist.model import RDT
from mythos_dist.objective import answer_positions, valid_positions
from mythos_dist.sweep import chain_batches

LOOPS = (1, 2, 4, 6, 8)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--split", default="ood1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = Config()  # digit-chain defaults: dim 128, GQA, 8 experts top-2
    cfg.model = ModelConfig(dim=128, attn_type="gqa", n_experts=8, n_experts_per_tok=2)
    torch.manual_seed(0)
    model = RDT(cfg.model).eval()
    b = next(chain_batches(cfg, args.split, 0, args.batch, args.batch))
    ids_BT, pos_B = b["input_ids"], answer_positions(b["loss_mask"])
    valid_BT = valid_positions(b["loss_mask"])
    opts = {"valid_BT": valid_BT, "logits_at_B": pos_B}

    def one_pass() -> None:
        model(ids_BT, n_loops=max(LOOPS), loops_out=LOOPS, track_deltas=True, **opts)

    def separate() -> None:
        for n in LOOPS:
            model(ids_BT, n_loops=n, track_deltas=True, **opts)

    def separate_naive() -> None:
        rows_B = torch.arange(ids_BT.shape[0])
        for n in LOOPS:
            model(ids_BT, n_loops=n).logits[rows_B, pos_B].argmax(-1)

    arms = {"one-pass sweep": one_pass, "separate forwards": separate, "separate, naive": separate_naive}
    times: dict[str, list[float]] = {k: [] for k in arms}
    with torch.no_grad():
        for fn in arms.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in arms.items():
                times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"loops {','.join(map(str, LOOPS))}, batch {ids_BT.shape[0]}×{ids_BT.shape[1]} ({args.split}), "
        f"dim {cfg.model.dim}, {cfg.model.n_experts} experts top-{cfg.model.n_experts_per_tok}, "
        f"threads {args.threads}, median of {args.reps}"
    )
    for k, v in med.items():
        print(f"  {k:<20} {v * 1e3:8.1f} ms")
    print(
        f"ratio one-pass / separate forwards: {med['one-pass sweep'] / med['separate forwards']:.3f} (target ≤ 0.45)"
    )
    print(f"ratio one-pass / naive separate:    {med['one-pass sweep'] / med['separate, naive']:.3f}")


if __name__ == "__main__":
    main()
