"""Worker for the distributed training tests: `train()` on in-memory digit chains, then dumps.

Usage (under torchrun, or plain python for one process):
  train_worker.py OUT_DIR [--stop-after N] [--set section.key=value ...]
Writes OUT_DIR/summary_rank<r>.json (per-step losses, start/end step) and, after a complete run,
OUT_DIR/logits_rank<r>.pt: eval-mode logits of this rank's next micro batch, for export checks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.batch import ChainBatches
from mythos_dist.config import load_config
from mythos_dist.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(None, args.set)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    batches = ChainBatches(cfg.data.task, cfg.train.micro_batch_size, rank, world)
    summary = train(cfg, batches, stop_after_steps=args.stop_after)
    args.out.mkdir(parents=True, exist_ok=True)
    keep = (
        "start_step",
        "end_step",
        "losses",
        "grad_norms",
        "final_loss",
        "export",
        "tokens",
        "tokens_per_s",
        "train_s",
    )
    (args.out / f"summary_rank{rank}.json").write_text(json.dumps({k: getattr(summary, k) for k in keep}))
    if summary.end_step == cfg.train.steps:
        model = summary.model.eval()
        batch = batches.batch(10_000)  # an unseen batch, different on each rank
        with torch.no_grad():
            logits = model(batch["input_ids"], cfg.train.loops.n_loops).logits
        torch.save({"input_ids": batch["input_ids"], "logits": logits}, args.out / f"logits_rank{rank}.pt")
    if dist.is_initialized():  # leave together: a rank exiting with a live process group may abort
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
