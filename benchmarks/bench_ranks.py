"""Training tokens/s at 2 ranks x 1 thread over 1 rank x 1 thread (ZeRO-2, EP=1 and EP=2), gloo on CPU.

    .venv/bin/python benchmarks/bench_ranks.py [--steps 10] [--rounds 2]

The main job's model and micro batch (configs/digit_chain.yaml: 128 chains per rank, 4 loops),
the real DeepSpeed engine; each rank trains on its own micro batches, so 2 ranks process twice
the tokens per step. Runs 1 rank, 2 ranks EP=1, and 2 ranks EP=2 with the all-to-all over local
sockets (parallel.ep_transport=auto, the default), over gloo (process_group), and padded (sync-free,
parallel.ep_dispatch) in turn (--rounds times, each in fresh processes) and prints, per layout,
tokens/s from the wall clock and from each rank's CPU
seconds (user + system: on a machine shared with other jobs a rank waits for a core, and the wall
clock counts that wait), and where a rank's step time goes: the seconds inside torch.distributed
collectives (all-to-all, all-reduce, reduce-scatter, ...; timed around each call) and the rest.
The load average before and after is printed: on a busy machine only the CPU-second figures say
what 2 ranks would do on 2 free cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLLECTIVES = [
    "all_to_all_single",
    "all_reduce",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_gather_into_tensor",
    "all_gather",
    "broadcast",
    "reduce",
    "barrier",
]


def time_collectives(spent: dict[str, list[float]]) -> None:
    """Wrap torch.distributed's collectives and the local-socket all-to-all: [wall, cpu] seconds
    per name, accumulated in `spent`. Both run synchronously on CPU, so the time inside the call
    is the collective's."""
    import torch.distributed as dist

    from mythos_dist.ep_transport import LocalSocketAllToAll

    def wrap(owner: object, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **kw):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                spent[name][0] += time.perf_counter() - w
                spent[name][1] += time.process_time() - c

        setattr(owner, attr, timed)

    for name in COLLECTIVES:
        wrap(dist, name, name)
    wrap(LocalSocketAllToAll, "__call__", "all_to_all (sockets)")


def worker(out: Path, ep: int, dispatch: str, transport: str, steps: int) -> None:
    import logging

    import torch.distributed as dist

    from mythos_dist.config import load_config
    from mythos_dist.model import RDT
    from mythos_dist.objective import answer_forward, loss_and_metrics, valid_positions
    from mythos_dist.parallel import build_engine, init_distributed, parallelize, sync_router_biases
    from mythos_dist.train import ChainBatches

    sets = [
        f"parallel.ep_size={ep}",
        "parallel.zero_stage=2",
        "tracking.enabled=false",
        f"parallel.ep_dispatch={dispatch}",
        f"parallel.ep_transport={transport}",
    ]
    cfg = load_config(REPO / "configs" / "digit_chain.yaml", sets)
    init_distributed(600)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    par = cfg.parallel
    model = parallelize(RDT(cfg.model), ep, par.ep_dispatch, par.ep_transport, par.timeout_s)
    engine, _ = build_engine(model, cfg, world, log=lambda *_: None)
    batches = iter(ChainBatches(cfg.data.task, cfg.train.micro_batch_size, rank, world))
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    time_collectives(spent)
    n_loops = cfg.train.loops.n_loops
    tokens = 0
    for step in range(steps + 2):
        if step == 2:  # after warm-up (optimizer state allocated, caches hot)
            dist.barrier()
            spent.clear()
            tokens, wall, cpu = 0, time.perf_counter(), time.process_time()
        batch = next(batches)
        loss, _ = loss_and_metrics(answer_forward(engine, batch, n_loops), batch, cfg.model)
        engine.backward(loss)
        engine.step()
        sync_router_biases(engine.module)
        tokens += int(valid_positions(batch["loss_mask"]).sum())  # as the trainer counts them
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    dist.barrier()
    row = {"rank": rank, "world": world, "ep": ep, "steps": steps, "tokens": tokens, "wall_s": wall}
    row |= {"cpu_s": cpu, "collectives": {k: v for k, v in spent.items() if k != "barrier"}}
    (out / f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_ranks")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dispatch", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--transport", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.ep, args.dispatch, args.transport, args.steps)
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_moe import host_line

    torch.set_num_threads(1)
    print(host_line(1, time.process_time)[0] + ", clock=cpu")
    print(f"load average before: {load()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    # (ranks, EP, dispatch, transport)
    layouts = [
        (1, 1, "exact", "auto"),
        (2, 1, "exact", "auto"),
        (2, 2, "exact", "auto"),
        (2, 2, "exact", "process_group"),
        (2, 2, "padded", "auto"),
    ]
    runs: dict[tuple[int, int, str, str], list[list[dict]]] = defaultdict(list)
    for r in range(args.rounds):
        for n, ep, dispatch, transport in layouts:
            out = args.out / f"round{r}_w{n}_ep{ep}_{dispatch}_{transport}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            cmd += [__file__, "--worker", str(out), "--ep", str(ep), "--dispatch", dispatch]
            cmd += ["--transport", transport, "--steps", str(args.steps)]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            runs[(n, ep, dispatch, transport)].append(
                [json.loads((out / f"rank{i}.json").read_text()) for i in range(n)]
            )
    print(f"load average after: {load()}")

    def rates(ranks: list[dict]) -> tuple[float, float]:
        tokens = sum(r["tokens"] for r in ranks)
        return tokens / max(r["wall_s"] for r in ranks), tokens / max(r["cpu_s"] for r in ranks)

    base = [rates(rs) for rs in runs[layouts[0]]]
    print(
        f"\n{'layout':26s} {'tok/s wall':>11s} {'vs 1 rank':>9s} {'tok/s cpu':>10s} {'vs 1 rank':>9s}  "
        "per step and rank (cpu s): collectives / rest"
    )
    for n, ep, dispatch, transport in layouts:
        name = f"{n} rank(s), EP={ep}"
        if ep > 1:
            name += (" padded" if dispatch == "padded" else "") + (
                " gloo" if transport == "process_group" else " sockets"
            )
        for r, ranks in enumerate(runs[(n, ep, dispatch, transport)]):
            wall, cpu = rates(ranks)
            steps = ranks[0]["steps"]
            parts = []
            for rk in ranks:
                coll = {k: v[1] / steps for k, v in rk["collectives"].items() if v[1] > 0}
                rest = rk["cpu_s"] / steps - sum(coll.values())
                parts.append(
                    " ".join(f"{k} {v * 1e3:.1f}ms" for k, v in coll.items()) + f" rest {rest * 1e3:.0f}ms"
                )
            print(
                f"{name:26s} {wall:11.0f} {wall / base[r][0]:8.2f}x {cpu:10.0f} "
                f"{cpu / base[r][1]:8.2f}x  " + " | ".join(parts)
            )


if __name__ == "__main__":
    main()
