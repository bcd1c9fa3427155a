"""Where an EP=2 training run's all-to-all time goes: waiting for the other rank, or the exchange
itself. Trains a config (default: recipe 14, full-length chains from step 1) on 2 processes for
--steps steps, once per transport (parallel.ep_transport: process_group = gloo, auto = local
sockets), and timestamps every all-to-all call on both ranks (one clock: the same host). Per call,
"waiting" is the time until the later rank arrives, "exchange" the time from then to this rank's
exit; both over the second half of the calls (warm).

    .venv/bin/python benchmarks/trace_all_to_all.py [--config C] [--steps 200]
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(out: Path, train_args: list[str]) -> None:
    """One rank: every all-to-all call timed ((enter, exit) ns), then `mythos train`."""
    from mythos_dist.cli import main
    from mythos_dist.ep_transport import LocalSocketAllToAll
    from mythos_dist.model.dispatch import ProcessGroupAllToAll

    calls: list[tuple[int, int]] = []
    for cls in (ProcessGroupAllToAll, LocalSocketAllToAll):
        fn = cls.__call__

        def timed(self, *a, _fn=fn, **kw):
            t = time.perf_counter_ns()
            try:
                return _fn(self, *a, **kw)
            finally:
                calls.append((t, time.perf_counter_ns()))

        cls.__call__ = timed
    atexit.register(lambda: np.save(out / f"rank{os.environ['RANK']}.npy", np.array(calls, dtype=np.int64)))
    main(["train", *train_args])


def summarize(out: Path) -> dict[str, float]:
    r0, r1 = (np.load(out / f"rank{r}.npy") for r in (0, 1))
    assert len(r0) == len(r1), "the ranks made different numbers of all-to-all calls"
    half = slice(len(r0) // 2, None)
    enter = np.stack([r0[half, 0], r1[half, 0]])
    leave = np.stack([r0[half, 1], r1[half, 1]])
    last = enter.max(0)
    span = leave[:, -1] - enter[:, 0]
    return {
        "calls": float(len(r0)),
        "share": float(((leave - enter).sum(1) / span).mean()),
        "wait_ms": float((last - enter).mean() / 1e6),
        "exchange_ms": float((leave - last).mean() / 1e6),
        "skew_p95_ms": float(np.percentile(np.abs(leave[0] - leave[1]), 95) / 1e6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "digit_chain_recipe14.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "trace_all_to_all")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(args.worker, ["--config", args.config, *rest])
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_moe import host_line

    print(host_line(1, time.perf_counter)[0] + ", clock=wall")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    print(f"{'transport':14s} {'tok/s':>7s} {'calls':>6s} {'in a2a':>7s} {'wait ms':>8s} {'exchange ms':>12s} "
          f"{'exit skew p95 ms':>17s}")  # fmt: skip
    for transport in ("process_group", "auto"):
        out = args.out / transport
        subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        sets = [f"train.steps={args.steps}", "train.length_curriculum_steps=1", "parallel.ep_size=2",
                f"parallel.ep_transport={transport}", "checkpoint.every=0", "checkpoint.average_last=1",
                "tracking.enabled=false", f"checkpoint.dir={out / 'ck'}"]  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        cmd += ["--worker", str(out), "--config", args.config, *[a for s in sets for a in ("--set", s)]]
        log = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        tok_s = re.findall(rf"^step {args.steps}/.*tok/s ([\d,]+)", log, re.M)[-1]
        s = summarize(out)
        print(f"{transport:14s} {tok_s:>7s} {s['calls']:6.0f} {s['share']:7.1%} {s['wait_ms']:8.3f} "
              f"{s['exchange_ms']:12.3f} {s['skew_p95_ms']:17.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
