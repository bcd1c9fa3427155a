"""ZeRO and expert-parallel memory / throughput on this machine (CPU, gloo).

  .venv/bin/python benchmarks/bench_zero_ep.py [--steps 6] [--out runs/bench_zero_ep.json]

Launches itself under torchrun (2 ranks, then 1 rank) and prints markdown tables:
  1. Adam state bytes per rank for ZeRO 0/1/2 at 2 ranks (EP=1), and the fp32 master partition
     ZeRO keeps besides the model weights; tokens/s at 1 and 2 ranks.
  2. Expert-count scaling (8..64 experts, EP=1 vs EP=2, ZeRO-2, 2 ranks): tokens/s, param bytes,
     routed-expert param bytes and param+optimizer bytes per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t) and t.dim() > 0)


def measure(cfg, steps: int) -> dict[str, float]:
    """Build the engine for cfg, train `steps` (+2 warm-up) steps, return per-rank numbers."""
    import torch.distributed as dist

    from data_pipeline.batch import ChainBatches
    from mythos_dist.model import RDT
    from mythos_dist.model.moe import GroupedExperts
    from mythos_dist.objective import answer_forward, loss_and_metrics
    from mythos_dist.parallel import build_engine, parallelize, sync_router_biases

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = parallelize(RDT(cfg.model), cfg.parallel.ep_size)
    engine, _ = build_engine(model, cfg, world, log=lambda *_: None)
    it = iter(ChainBatches(cfg.data.task, cfg.train.micro_batch_size, rank, world))
    tokens, t0 = 0, 0.0
    for step in range(steps + 2):
        if step == 2:  # after warm-up (optimizer state allocated, caches hot)
            dist.barrier()
            t0, tokens = time.perf_counter(), 0
        batch = next(it)
        loss, _ = loss_and_metrics(answer_forward(engine, batch, cfg.train.loops.n_loops), batch, cfg.model)
        engine.backward(loss)
        engine.step()
        sync_router_biases(engine.module)
        tokens += batch["input_ids"].numel()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps a torch AdamW over flat fp32 partitions
    adam = sum(_bytes(s.values()) for s in inner.state.values())
    master = _bytes(getattr(opt, "single_partition_of_fp32_groups", []))
    params = _bytes(engine.module.parameters())
    experts = sum(_bytes(m.parameters()) for m in engine.module.modules() if isinstance(m, GroupedExperts))
    return {
        "tokens_per_s": tokens * world / elapsed,
        "adam_bytes": adam,
        "master_bytes": master,
        "param_bytes": params,
        "expert_param_bytes": experts,
        "param_opt_bytes": params + adam + master,
    }


def config(dim: int, experts: int, ep: int, zero: int):
    from mythos_dist.config import load_config

    return load_config(
        None,
        [
            f"model.dim={dim}",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            f"model.n_experts={experts}",
            "model.n_experts_per_tok=2",
            f"model.expert_dim={dim}",
            "model.lora_rank=4",
            "train.micro_batch_size=32",
            "train.loops.n_loops=2",
            "train.warmup_steps=1",
            "data.task.n_train=20000",
            f"parallel.ep_size={ep}",
            f"parallel.zero_stage={zero}",
            "tracking.enabled=false",
        ],
    )


def worker(out: Path, steps: int) -> None:
    import logging

    import torch.distributed as dist

    from mythos_dist.parallel import init_distributed

    init_distributed(600)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    world = dist.get_world_size()
    results = []
    runs = [("zero", 128, 8, 1, z) for z in (0, 1, 2)]
    if world == 2:
        runs += [("experts", 64, e, ep, 2) for e in (8, 16, 32, 64) for ep in (1, 2)]
    for kind, dim, e, ep, zero in runs:
        m = measure(config(dim, e, ep, zero), steps)
        results.append({"kind": kind, "world": world, "dim": dim, "experts": e, "ep": ep, "zero": zero, **m})
        if dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))


def table(rows: list[dict]) -> str:
    mb = 1 / 2**20
    z = {r["zero"]: r for r in rows if r["kind"] == "zero" and r["world"] == 2}
    lines = [
        "| ZeRO | Adam state / rank (MiB) | vs stage 0 | + fp32 master (MiB) | tokens/s, 2 ranks |",
        "|---|---|---|---|---|",
    ]
    for s, r in sorted(z.items()):
        lines.append(
            f"| {s} | {r['adam_bytes'] * mb:.2f} | {r['adam_bytes'] / z[0]['adam_bytes']:.2f}x "
            f"| {(r['adam_bytes'] + r['master_bytes']) * mb:.2f} | {r['tokens_per_s']:,.0f} |"
        )
    one = {r["zero"]: r for r in rows if r["kind"] == "zero" and r["world"] == 1}
    lines += ["", "| ranks | ZeRO | tokens/s |", "|---|---|---|"]
    lines += [f"| 1 | {s} | {r['tokens_per_s']:,.0f} |" for s, r in sorted(one.items())]
    lines += [f"| 2 | {s} | {r['tokens_per_s']:,.0f} |" for s, r in sorted(z.items())]
    lines += [
        "",
        "| experts | EP | tokens/s | params / rank (MiB) | routed-expert params / rank (MiB) | params+optimizer / rank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["kind"] == "experts"), key=lambda r: (r["experts"], r["ep"])):
        lines.append(
            f"| {r['experts']} | {r['ep']} | {r['tokens_per_s']:,.0f} | {r['param_bytes'] * mb:.2f} "
            f"| {r['expert_param_bytes'] * mb:.2f} | {r['param_opt_bytes'] * mb:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_zero_ep.json")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    rows = []
    for n in (2, 1):
        part = args.out.with_suffix(f".w{n}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        subprocess.run(
            [*cmd, __file__, "--steps", str(args.steps), "--worker", str(part)], env=env, check=False
        )
        rows += json.loads(part.read_text())
    args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
