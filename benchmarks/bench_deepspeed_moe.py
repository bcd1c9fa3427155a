"""Side-by-side speed of our MoE layer vs DeepSpeed-MoE's own layer (deepspeed.moe.layer.MoE).

    make bench-deepspeed       # or: .venv/bin/python benchmarks/bench_deepspeed_moe.py --threads 1

Both sides: dim 256, 64 experts of SwiGLU width 128, one always-on dense expert of the same width
(ours: a shared expert; DeepSpeed's: `use_residual=True`, Residual-MoE, which adds a learned mix),
forward+backward of the whole layer. DeepSpeed's TopKGate at k = 2 and 4, each with token dropping
at capacity factor 1.0 and 1.25 and with its no-drop setting (`drop_tokens=False`: every expert is
padded to the busiest one's count); ours is dropless in every case. One rank at each token count,
then the same on 2 real gloo processes at EP=2 (torchrun; tokens per rank as given, all-to-all
included). Prints tokens/s, ours / DeepSpeed and the fraction of token copies DeepSpeed drops.
Interleaved repeats, median reported: only the ratios are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import host_line, time_pair

from mythos_dist.model.dispatch import AllToAllDispatcher
from mythos_dist.model.moe import MoEFFN, SwiGLU

DIM, N_EXPERTS, EXPERT_DIM = 256, 64, 128
# (k, capacity factor, drop tokens)
DS_SETTINGS = [(k, cf, drop) for k in (2, 4) for cf, drop in ((1.0, True), (1.25, True), (1.0, False))]


def init_small(module: torch.nn.Module) -> torch.nn.Module:
    """The same weight scale on both sides (bench_moe's): routing starts near uniform for both."""
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return module


def ours_layer(k: int, ep_size: int) -> MoEFFN:
    layer = init_small(MoEFFN(DIM, N_EXPERTS, k, EXPERT_DIM, n_shared=1, shared_dim=EXPERT_DIM))
    if ep_size > 1:
        n_local, rank = N_EXPERTS // ep_size, dist.get_rank()
        layer.experts.shard(rank * n_local, n_local)
        layer.dispatcher = AllToAllDispatcher(N_EXPERTS, None)
    return layer


def deepspeed_layer(k: int, cf: float, drop: bool, ep_size: int) -> torch.nn.Module:
    from deepspeed.moe.layer import MoE

    layer = MoE(
        DIM,
        SwiGLU(DIM, EXPERT_DIM),
        num_experts=N_EXPERTS,
        ep_size=ep_size,
        k=k,
        capacity_factor=cf,
        drop_tokens=drop,
        use_residual=True,
    )
    if ep_size > 1:
        layer.set_deepspeed_parallelism()
    return init_small(layer)


def dropped_fraction(layer: torch.nn.Module, x_ND: torch.Tensor) -> float:
    """Token copies (token, expert) the gate drops at its capacity, from the gate's own routes."""
    with torch.no_grad():
        expert_idx = layer.deepspeed_moe.gate(x_ND, None, True)[3]  # -1 where dropped
    return (expert_idx < 0).float().mean().item()


def run_cases(
    n_tokens: int, ep_size: int, repeats: int, clock: Callable[[], float]
) -> list[tuple[str, float, float, float]]:
    """-> (setting, ours tokens/s, DeepSpeed tokens/s, DeepSpeed's dropped fraction); tokens over all ranks."""
    rank = dist.get_rank() if ep_size > 1 else 0
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x_ND = torch.randn(n_tokens, DIM, requires_grad=True)
    fence = dist.barrier if ep_size > 1 else (lambda: None)
    inner = 1 if n_tokens > 1024 else 3
    ours = {k: ours_layer(k, ep_size) for k in (2, 4)}
    rows = []
    for k, cf, drop in DS_SETTINGS:
        ds = deepspeed_layer(k, cf, drop, ep_size)

        def step_ours(layer=ours[k]) -> None:
            y, _ = layer(x_ND)
            y.sum().backward()

        def step_ds(layer=ds) -> None:
            y, _, _ = layer(x_ND[None])
            y.sum().backward()

        secs = time_pair({"ours": step_ours, "ds": step_ds}, repeats, inner, fence, clock)
        dropped = torch.tensor([dropped_fraction(ds, x_ND)])
        if ep_size > 1:
            dist.all_reduce(dropped)
            dropped /= ep_size
            secs = {name: max_over_ranks(s) for name, s in secs.items()}
        setting = f"k={k} " + (f"cf={cf}" if drop else "no-drop")
        total = n_tokens * ep_size
        rows.append((setting, total / secs["ours"], total / secs["ds"], dropped.item()))
    return rows


def max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def print_rows(title: str, rows: list[tuple[str, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'DeepSpeed setting':18s} {'ours tok/s':>11s} {'DS tok/s':>10s} {'ours/DS':>8s} {'DS drops':>9s}")
    for setting, ours, ds, dropped in rows:
        print(f"{setting:18s} {ours:11.0f} {ds:10.0f} {ours / ds:7.2f}x {dropped:9.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="per rank")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096], help="per rank")
    ap.add_argument("--ep-tokens", type=int, nargs="*", default=[4096], help="per rank at EP=2 (none: skip)")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: each process's CPU seconds (user+system; robust on a shared machine), wall: elapsed",
    )
    ap.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.ep_worker:  # one of the 2 ranks under torchrun
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        results = [(n, run_cases(n, 2, args.repeats, clock)) for n in args.ep_tokens]
        if dist.get_rank() == 0:
            for n, rows in results:
                print_rows(
                    f"EP=2 on 2 ranks x {args.threads} thread, {n} tokens per rank (tok/s of both)", rows
                )
        dist.barrier()  # leave together: a rank exiting with a live process group may abort a peer
        dist.destroy_process_group()
        return
    import deepspeed

    print(host_line(args.threads, clock)[0] + f", deepspeed {deepspeed.__version__}, clock={args.clock}")
    for n in args.tokens:
        print_rows(f"1 rank, {n} tokens, forward+backward", run_cases(n, 1, args.repeats, clock))
    if args.ep_tokens:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        cmd += [
            "--ep-worker",
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--clock",
            args.clock,
        ]
        cmd += ["--ep-tokens", *map(str, args.ep_tokens)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(out.stdout, end="")
        if out.returncode != 0:
            raise SystemExit(f"EP=2 run failed ({out.returncode}):\n{out.stderr[-3000:]}")


if __name__ == "__main__":
    main()
