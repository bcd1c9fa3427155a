"""Cost of MLflow's system metrics (tracking.system_metrics) on the training step time, side by side.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_system_metrics.py [--steps 40] [--rounds 3] \\
      [--intervals 10,1]

Starts a real `mlflow server` on 127.0.0.1, then trains the laptop recipe's model and batch
(configs/digit_chain.yaml, one process, ep_size=1, batches from the generator) with tracking on,
alternating system metrics off and on at each sampling interval, --rounds times; prints the median
step time after the first 10 steps (steady state: the sampler has started) of each, over the
rounds, and the median over rounds of its ratio to off in the same round. The sampler's one-off start (importing MLflow's system-metrics code,
~2 s of CPU here) is not in it. Results: docs/benchmarks.md, "MLflow system metrics".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_moe import matmul_gflops  # noqa: E402
from data_pipeline.batch import ChainBatches  # noqa: E402
from mythos_dist.config import load_config  # noqa: E402
from mythos_dist.train import train  # noqa: E402
from tests.mlflow_servers import Server  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def stamp(ends: list[float], _step: object, _model: object) -> None:
    ends.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--intervals", default="10,1", help="sampling intervals in seconds, comma-separated")
    args = ap.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    torch.set_num_threads(1)
    peak = statistics.median(matmul_gflops(1024) for _ in range(5))
    print(
        f"{cpu_model()}, cpu={torch.backends.cpu.get_cpu_capability()}, threads=1 fp32 matmul "
        f"{peak:.1f} GFLOP/s, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        server.start()
        try:
            cases = {"off": None, **{f"on, every {i:g} s": i for i in intervals}}
            per_step: dict[str, list[float]] = {name: [] for name in cases}
            k = 0
            for _ in range(args.rounds):
                for name, interval in cases.items():
                    k += 1
                    sets = [
                        "parallel.ep_size=1",
                        f"train.steps={args.steps}",
                        "train.warmup_steps=0",
                        "checkpoint.every=0",
                        f"checkpoint.dir={tmp}/ckpt{k}",
                        f"tracking.uri={server.url}",
                        "tracking.experiment=bench-system-metrics",
                        f"tracking.system_metrics={interval is not None}",
                        f"tracking.system_metrics_interval_s={interval or 10}",
                    ]
                    cfg = load_config(str(REPO / "configs" / "digit_chain.yaml"), sets)
                    ends: list[float] = []
                    batches = ChainBatches(cfg.data.task, cfg.train.micro_batch_size, 0, 1)
                    train(cfg, batches, log=lambda *_: None, on_step=partial(stamp, ends))
                    # steady state: the median step after the first 10 (the sampler has started by then)
                    per_step[name].append(statistics.median(b - a for a, b in pairwise(ends[10:])))
                    print(f"  {name:<16} {per_step[name][-1] * 1e3:7.1f} ms/step", flush=True)
        finally:
            server.stop()
    print(f"\n{args.steps} steps per run, {args.rounds} alternated rounds, median ms/step after step 10;")
    print("ratio: median over rounds of (on / off of the same round)")
    print("| system metrics | ms/step | per-round on / off | median ratio |\n|---|---|---|---|")
    off = per_step["off"]
    for name, times in per_step.items():
        ratios = [t / o for t, o in zip(times, off)]
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(
            f"| {name} | {statistics.median(times) * 1e3:.1f} | {shown} | {statistics.median(ratios):.3f} |"
        )


if __name__ == "__main__":
    main()
