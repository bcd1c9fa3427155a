"""Worker for the host-sync count: under torchrun (EP = world size) or as one plain process (EP=1).

_sync_worker.py OUT DISPATCH LOOPS...  the tiny MoE RDT, experts sharded over the ranks and routed
by all-to-all (DISPATCH: exact or padded), one real batch forward+backward per loop count; writes
OUT/syncs_rank<r>.json: {loops: {"total": n, "by_site": {...}}}, and OUT/grads_rank<r>.pt: the
loss and every gradient per loop count.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.batch import chains_batch
from data_pipeline.digit_chain import TRAIN, generate
from mythos_dist.config import ModelConfig, TaskConfig
from mythos_dist.model import RDT
from mythos_dist.model.dispatch import use_all_to_all
from mythos_dist.objective import answer_forward, loss_and_metrics
from tests.host_syncs import HostSyncCounter


def main() -> None:
    out, dispatch, loop_counts = Path(sys.argv[1]), sys.argv[2], [int(a) for a in sys.argv[3:]]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=12, dim=32, n_heads=2, n_kv_heads=1, max_seq_len=64, n_experts=4, n_experts_per_tok=2, expert_dim=16
    )  # fmt: skip
    model = RDT(cfg)
    if world > 1:
        for moe in model.moe_layers():
            n_local = cfg.n_experts // world
            moe.experts.shard(rank * n_local, n_local)
        use_all_to_all(model, None, dispatch)
    # each rank its own micro batch (different routing, uneven splits)
    batch = chains_batch(generate(TaskConfig(n_train=64, n_eval=10), TRAIN, 16 * rank, 16 * rank + 16))
    counts, grads = {}, {}
    for loops in loop_counts:
        model.zero_grad()
        with HostSyncCounter() as c:
            loss, _ = loss_and_metrics(answer_forward(model, batch, n_loops=loops), batch, cfg)
            loss.backward()
        counts[loops] = {"total": c.total, "by_site": dict(c.by_site)}
        grads[loops] = {"loss": loss.detach()} | {n: p.grad.clone() for n, p in model.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"syncs_rank{rank}.json").write_text(json.dumps(counts))
    torch.save(grads, out / f"grads_rank{rank}.pt")
    if world > 1:  # leave together: a rank exiting with a live process group may abort a peer
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
