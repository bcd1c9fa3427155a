"""Cost of reading checkpoint files without running code, beside the unsafe read it replaced.

  .venv/bin/python benchmarks/bench_checkpoint_load.py [--experts 32] [--repeats 7]

Trains one step of a mid-size MoE RDT (1 process, ZeRO-1) to write a real DeepSpeed checkpoint,
then reads each kind of file alternately with `torch.load(weights_only=False)` (the old path) and
`safe_io.torch_load` (globals listed from the pickle's opcodes, then the weights_only unpickler),
median of the repeats, and prints the ratio per file kind and for the whole checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_moe import matmul_gflops  # noqa: E402
from data_pipeline.batch import ChainBatches  # noqa: E402
from mythos_dist import safe_io  # noqa: E402
from mythos_dist.config import load_config  # noqa: E402
from mythos_dist.train import train  # noqa: E402


def timed(load, files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        load(f)
    return time.perf_counter() - t


def unsafe_load(f: Path) -> object:
    return torch.load(f, map_location="cpu", weights_only=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    peak = statistics.median(matmul_gflops(1024) for _ in range(5))
    print(
        f"cpu={torch.backends.cpu.get_cpu_capability()} threads=1 fp32 matmul {peak:.1f} GFLOP/s, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            "model.dim=256",
            f"model.n_experts={args.experts}",
            "model.expert_dim=256",
            "train.steps=1",
            "train.warmup_steps=0",
            "train.micro_batch_size=16",
            "parallel.zero_stage=1",
            "tracking.enabled=false",
            f"checkpoint.dir={tmp}/ckpt",
        ]
        cfg = load_config(None, sets)
        train(cfg, ChainBatches(cfg.data.task, cfg.train.micro_batch_size, 0, 1))
        files = sorted((Path(tmp) / "ckpt" / "step_00000001").glob("*.pt"))
        kinds = {
            "dense (mp_rank_00_model_states.pt)": [f for f in files if f.name.startswith("mp_rank")],
            f"experts ({args.experts} layer_*_expert_* files)": [f for f in files if "_expert_" in f.name],
            "ZeRO optimizer (zero_pp_rank_0_*)": [f for f in files if f.name.startswith("zero_pp")],
            "ours (extra_rank0.pt)": [f for f in files if f.name.startswith("extra_rank")],
        }
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"checkpoint: {len(files)} files, {mib:.1f} MiB; median of {args.repeats} alternated reads\n")
        print("| file kind | unsafe torch.load ms | safe torch_load ms | safe / unsafe |\n|---|---|---|---|")
        totals = [0.0, 0.0]
        for kind, group in kinds.items():
            old, new = [], []
            for _ in range(args.repeats):
                old.append(timed(unsafe_load, group))
                new.append(timed(safe_io.torch_load, group))
            o, n = statistics.median(old), statistics.median(new)
            totals = [totals[0] + o, totals[1] + n]
            print(f"| {kind} | {o * 1e3:.1f} | {n * 1e3:.1f} | {n / o:.2f}× |")
        print(
            f"| whole checkpoint | {totals[0] * 1e3:.1f} | {totals[1] * 1e3:.1f} | {totals[1] / totals[0]:.2f}× |"
        )


if __name__ == "__main__":
    main()
