"""Worker for the scale tests (under torchrun, or plain python for one process).

_scale_worker.py build OUT [--set k=v ...]   build_model (meta device, this rank's experts only);
    writes OUT/build_rank<r>.pt: this rank's weights (plain RDT names) and the peak RSS the build
    added, and for contrast the peak RSS of building the full model and slicing it (the old way).
_scale_worker.py engine OUT [--set k=v ...]  build_model + DeepSpeed engine + one training step;
    writes OUT/engine_rank<r>.json: bytes of parameters, fp32 master weights and AdamW moments.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers under the plain RDT's names (the wrapper's `.layer.` removed)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {k.replace(".layer.", "."): v.detach().clone() for k, v in named}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["build", "engine"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    from mythos_dist.config import load_config
    from mythos_dist.model import RDT
    from mythos_dist.parallel import build_engine, build_model, init_distributed, parallelize

    cfg = load_config(None, args.set)
    info = init_distributed(cfg.parallel.timeout_s)
    rank = info.rank
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "build":
        # The build's one collective (the expert-parallel transport's handshake) is gloo's first on
        # this group, and gloo's first collective allocates ~6-15 MB of its own buffers whatever the
        # model: have it before the measurement. No other warm-up: building on meta must not load
        # torch's compiler stack either (a gloo collective imports no Python module).
        dist.all_gather_object([None] * info.world_size, rank)
        reset_peak_rss()
        before = rss_bytes("VmRSS")
        model = build_model(cfg, info.device)
        build_peak = rss_bytes("VmHWM") - before
        own = sum(p.numel() * p.element_size() for p in model.parameters())
        state = plain_state(model)
        del model
        reset_peak_rss()
        before = rss_bytes("VmRSS")
        torch.manual_seed(cfg.train.seed)
        full = parallelize(RDT(cfg.model), cfg.parallel.ep_size)  # the old way: all experts, then slice
        full_peak = rss_bytes("VmHWM") - before
        del full
        torch.save(
            {"state": state, "build_peak": build_peak, "own_bytes": own, "full_build_peak": full_peak},
            args.out / f"build_rank{rank}.pt",
        )
        return
    from data_pipeline.batch import ChainBatches as Batches
    from mythos_dist.objective import answer_forward, loss_and_metrics

    model = build_model(cfg, info.device)
    engine, _ = build_engine(model, cfg, info.world_size, log=lambda *_: None)
    batch = next(iter(Batches(cfg.data.task, cfg.train.micro_batch_size, rank, info.world_size)))
    loss, _ = loss_and_metrics(answer_forward(engine, batch, 2), batch, cfg.model, None)
    engine.backward(loss)
    engine.step()
    opt = engine.optimizer
    master = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []))
    inner = getattr(opt, "optimizer", opt)
    moments = sum(
        v.numel() * v.element_size()
        for state in inner.state.values()
        for k, v in state.items()
        if torch.is_tensor(v) and k in ("exp_avg", "exp_avg_sq")
    )
    params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    (args.out / f"engine_rank{rank}.json").write_text(
        json.dumps({"params": params, "master": master, "moments": moments, "pid": os.getpid()})
    )


if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():  # leave together: a peer tearing down its gloo pairs while this
            dist.barrier()  # rank still uses them aborts it ("terminate called without an active exception")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
