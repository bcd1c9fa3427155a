"""Choose eval.auto_threshold on the validation set: accuracy and loops used per split for several
halting thresholds, beside the accuracy at every fixed loop count up to the cap, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python tools/halting_thresholds.py --config configs/digit_chain_recipe6.yaml \\
        --checkpoint runs/recipe6/checkpoints/export --thresholds 0.03,0.01,0.003

Always reads the validation set (eval.heldout=val): a threshold is a choice, and choices are made
on val; report the chosen one with `mythos eval --loops auto` on the test set.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mythos_dist.config import load_config
from mythos_dist.loading import load_model
from mythos_dist.model import LoopHalting
from mythos_dist.objective import answer_forward
from mythos_dist.sweep import chain_batches


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--thresholds", default="0.03,0.01,0.003")
    ap.add_argument("--n-samples", type=int, default=None)
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.set, "eval.heldout=val"])
    cap, n = cfg.eval.auto_max_loops, args.n_samples or cfg.eval.n_samples
    thresholds = [float(t) for t in args.thresholds.split(",")]
    model = load_model(args.checkpoint, cfg).eval()
    loops = list(range(1, cap + 1))
    print(f"validation set, cap {cap} loops, {n} samples per split")
    for split in cfg.eval.splits:
        fixed, auto = [], {t: ([], []) for t in thresholds}
        for b in chain_batches(cfg, split, 0, n, cfg.eval.batch_size):
            out = answer_forward(model, b, cap, loops_out=loops)
            fixed.append(torch.stack([out.loop_logits[k].argmax(-1) == b["answer"] for k in loops], 1))
            for t in thresholds:
                h = answer_forward(model, b, cap, halting=LoopHalting(t, cfg.eval.auto_min_loops))
                auto[t][0].append(h.logits.argmax(-1) == b["answer"])
                auto[t][1].append(h.loops_used)
        acc_L = torch.cat(fixed).float().mean(0).numpy()
        best = int(acc_L.argmax())
        print(f"{split}: best fixed {acc_L[best]:.3f} @{loops[best]}; @4/8/16/32 "
              + " ".join(f"{acc_L[k - 1]:.3f}" for k in (4, 8, 16, 32) if k <= cap))  # fmt: skip
        for t, (correct, used) in auto.items():
            u = torch.cat(used).numpy()
            print(f"  threshold {t:g}: acc {torch.cat(correct).float().mean():.3f}, loops mean {u.mean():.1f} "
                  f"p90 {np.percentile(u, 90):.0f} max {u.max()}")  # fmt: skip


if __name__ == "__main__":
    main()
