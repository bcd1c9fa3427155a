"""What the data loader costs inside the real 2-process training job: seconds per step with batches
from the streaming loader (several settings) beside batches generated in-process, one run.

    python benchmarks/bench_loader_in_training.py --config configs/digit_chain.yaml [--steps 160]

Each variant is a short `train()` under torchrun (2 ranks, the config's ZeRO/EP); the rate is taken
over the steps after the first quarter (engine start-up, first shard copies).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> overrides; "generated" uses ChainBatches (no loader at all)
    "generated": [],
    "loader, 0 workers, streaming default predownload": ["data.num_workers=0", "data.predownload=0"],
    "loader, 2 workers, streaming default predownload": ["data.num_workers=2", "data.predownload=0"],
    "loader, 0 workers, predownload whole split": ["data.num_workers=0", "data.predownload=1000000"],
    "loader, 2 workers, predownload whole split": ["data.num_workers=2", "data.predownload=1000000"],
}


def worker(args: argparse.Namespace) -> None:
    from data_pipeline.batch import ChainBatches
    from mythos_dist.config import load_config
    from mythos_dist.train import StepResult, train

    cfg = load_config(args.config, args.set)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    batches = ChainBatches(cfg.data.task, cfg.train.micro_batch_size, rank, world) if args.generated else None
    t0, first = 0.0, cfg.train.steps // 4

    def on_step(info: StepResult, _model: object) -> None:
        nonlocal t0
        if info.step == first:
            t0 = time.perf_counter()
        if info.step == cfg.train.steps and rank == 0:
            Path(args.out).write_text(str((time.perf_counter() - t0) / (cfg.train.steps - first)))

    train(cfg, batches, on_step=on_step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--generated", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-train-") as tmp:
        for name, sets in VARIANTS.items():
            out = Path(tmp) / "s_per_step"
            out.unlink(missing_ok=True)
            over = [*args.set, *sets, f"train.steps={args.steps}", "train.log_every=1000000",
                    "checkpoint.every=0", f"checkpoint.dir={tmp}/ckpt-{len(results)}", "tracking.enabled=false"]  # fmt: skip
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                   "--worker", "--config", args.config, "--out", str(out), *(a for s in over for a in ("--set", s))]  # fmt: skip
            if name == "generated":
                cmd.append("--generated")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp, "PYTHONPATH": str(REPO)}
            subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not out.is_file():
                sys.exit(f"variant {name!r} failed (rerun its command by hand to see why): {' '.join(cmd)}")
            results[name] = float(out.read_text())
            print(
                f"  {name:52s} {results[name]:.3f} s/step  ({results[name] / results['generated']:.2f}x generated)"
            )


if __name__ == "__main__":
    main()
