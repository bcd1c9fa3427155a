"""Evaluate the mean of a run's last checkpoints' weights beside its final checkpoint: does
averaging over the end of training steady length generalisation? (results: docs/results.md,
"Averaging the last checkpoints"). A run exports such a mean itself with checkpoint.average_last.

    OMP_NUM_THREADS=1 .venv/bin/python tools/average_checkpoints.py \\
        --config configs/digit_chain_recipe3.yaml runs/recipe3/checkpoints/step_0000{8,9}000 \\
        runs/recipe3/checkpoints/step_00010000

The last checkpoint given is "final". Every tensor (router biases included) is averaged, as
`mythos_dist.checkpoint.export` does for checkpoint.average_last.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from mythos_dist.checkpoint import export
from mythos_dist.config import load_config
from mythos_dist.loading import load_model
from mythos_dist.sweep import chain_batches, parse_loops, sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--loops", default="4,8,12,24")
    ap.add_argument("--n-samples", type=int, help="per split (default: eval.n_samples)")
    ap.add_argument("checkpoints", nargs="+", help="DeepSpeed step_* dirs, oldest first")
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        ap.error("give at least two checkpoints to average")
    cfg = load_config(args.config, args.set)
    loops = parse_loops(args.loops)
    n_samples = args.n_samples or cfg.eval.n_samples
    final = load_model(args.checkpoints[-1], cfg)
    with tempfile.TemporaryDirectory(prefix="mythos-average-") as tmp:
        averaged = load_model(export(args.checkpoints, tmp), cfg)
    print("weights     split  " + "".join(f"{f'@{n}':>7}" for n in loops))
    for name, model in (("final", final), (f"mean of {len(args.checkpoints)}", averaged)):
        for split in cfg.eval.splits:
            r = sweep(model, chain_batches(cfg, split, 0, n_samples, cfg.eval.batch_size), loops)
            print(
                f"{name:<11} {split:<6} " + "".join(f"{100 * a:7.1f}" for a in r.correct_NL.mean(0)),
                flush=True,
            )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
