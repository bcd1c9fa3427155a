"""The first N steps' losses of a training job, exactly, to prove that a refactor changed nothing.

    python tools/loss_trajectory.py --config configs/digit_chain.yaml --steps 200 --out before.json
    python tools/loss_trajectory.py --config configs/digit_chain.yaml --steps 200 --compare before.json

Runs `mythos train` on --nproc local processes (as `mythos experiment` does), logging every step,
into a scratch directory (shards, checkpoints, MLflow store), stops after --steps, and reads the
per-step loss back from the MLflow store. Losses are kept as float.hex: equal means bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def trajectory(config: str, steps: int, nproc: int, overrides: list[str]) -> list[float]:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="trajectory-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        sets = [f"data.remote={tmp}/shards", f"checkpoint.dir={tmp}/ckpt", f"tracking.uri={uri}",
                "train.log_every=1", *overrides]  # fmt: skip
        set_args = [a for kv in sets for a in ("--set", kv)]
        mythos = [sys.executable, "-m", "mythos_dist.cli"]
        subprocess.run([*mythos, "data", "build", "--config", config, *set_args], check=True)
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *mythos[1:], "train", "--config", config, "--stop-after", str(steps), *set_args]  # fmt: skip
        subprocess.run(cmd, check=True, env=env)
        client = MlflowClient(tracking_uri=uri)
        (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
        (run,) = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.parentRunId IS NULL")
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        return [m.value for m in history]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the trajectory here (JSON, losses as float.hex)")
    group.add_argument("--compare", help="a trajectory written with --out: report the first difference")
    args = ap.parse_args()
    losses = trajectory(args.config, args.steps, args.nproc, args.set)
    if len(losses) != args.steps:
        print(f"expected {args.steps} logged losses, got {len(losses)}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "loss_hex": [x.hex() for x in losses]}))
        print(f"{len(losses)} losses, first {losses[0]:.6f}, last {losses[-1]:.6f} -> {args.out}")
        return 0
    ref = [float.fromhex(h) for h in json.loads(Path(args.compare).read_text())["loss_hex"]]
    diff = [i for i, (a, b) in enumerate(zip(ref, losses, strict=True)) if a != b]
    if diff:
        i = diff[0]
        print(f"NOT bit-identical: {len(diff)} of {len(ref)} steps differ, first at step {i + 1}: "
              f"{ref[i]!r} vs {losses[i]!r}")  # fmt: skip
        return 1
    print(f"bit-identical: all {len(ref)} losses equal (last {losses[-1]!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
