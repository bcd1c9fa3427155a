"""Evaluate the mean of a run's last checkpoints' weights beside its final checkpoint: does
averaging over the end of training steady length generalisation? An experiment, not a library
feature (results: docs/results.md, "Averaging the last checkpoints").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/average_checkpoints.py \\
        --config configs/digit_chain_recipe3.yaml runs/recipe3/checkpoints/step_0000{8,9}000 \\
        runs/recipe3/checkpoints/step_00010000

The last checkpoint given is "final". Every tensor of the state dict (router biases included) is
averaged in fp32.
"""

from __future__ import annotations

import argparse
import copy

import torch

from mythos_dist.config import load_config
from mythos_dist.evaluate import chain_batches, load_model, parse_loops, sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--loops", default="4,8,12,24")
    ap.add_argument("--n-samples", type=int, help="per split (default: eval.n_samples)")
    ap.add_argument("checkpoints", nargs="+", help="DeepSpeed step_* dirs or export dirs, oldest first")
    args = ap.parse_args()
    if len(args.checkpoints) < 2:
        ap.error("give at least two checkpoints to average")
    cfg = load_config(args.config, args.set)
    loops = parse_loops(args.loops)
    n_samples = args.n_samples or cfg.eval.n_samples
    models = [load_model(c, cfg) for c in args.checkpoints]
    states = [m.state_dict() for m in models]
    averaged = copy.deepcopy(models[-1])
    averaged.load_state_dict(
        {
            k: (sum(s[k].float() for s in states) / len(states)).to(v.dtype)
            for k, v in averaged.state_dict().items()
        }
    )
    print("weights     split  " + "".join(f"{f'@{n}':>7}" for n in loops))
    for name, model in (("final", models[-1]), (f"mean of {len(models)}", averaged)):
        for split in cfg.eval.splits:
            r = sweep(model, chain_batches(cfg, split, 0, n_samples, cfg.eval.batch_size), loops)
            print(
                f"{name:<11} {split:<6} " + "".join(f"{100 * a:7.1f}" for a in r.correct_NL.mean(0)),
                flush=True,
            )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
