"""Training worker with injected faults, for the reliability tests (one process per rank).

Usage: _worker.py OUT [--streaming] [--fault KIND@STEP:RANK ...] [--set section.key=value ...]
  --streaming         train on the MDS shards in data.remote (the real loader), else ChainBatches
  kill@S:R            rank R SIGKILLs itself right after step S (after it is recorded)
  nan-loss@S:R        rank R's embedding output is NaN during step S: non-finite hidden state and loss
  inf-grad@S:R        rank R's forward is finite during step S but its backward gives inf gradients
  kill-save@S:R       rank R SIGKILLs itself while saving step S: after DeepSpeed's files, before ours
  enospc-save@S:R     rank R's write of its own file of checkpoint S fails with ENOSPC (disk full)
  enospc-model@S:R    ... of its first model-state file of checkpoint S (DeepSpeed's own writes)
  enospc-optim@S:R    ... of its ZeRO optimizer-state file of checkpoint S (DeepSpeed's own writes)
  term@S:R            rank R sends itself SIGTERM right after step S (as SLURM or torchrun would)
  pause@S:R           rank R, right after step S, writes OUT/paused_rank<R> and waits (≤ 120 s) for
                      OUT/go: the test cuts a link or sends a signal at a known step
Faults apply on a launch's first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT unset or 0).

Writes OUT/steps_rank<r>.jsonl, one line per optimizer step: step, sample ids, skipped, loss and
digests of this rank's parameters (`digest`), buffers (router biases), optimizer state (fp32 master
weights and AdamW moments, whatever the ZeRO stage) and LR schedule (position, lr); then
OUT/result_rank<r>.json: start/end step, skipped steps, tokens, and the error type and message when
train() raised (the process then exits with 1).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.batch import ChainBatches
from mythos_dist import checkpoint
from mythos_dist import train as train_module
from mythos_dist.config import load_config
from mythos_dist.train import StepResult, train


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: a non-finite gradient behind a finite loss."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("inf")


def digest(tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def optimizer_tensors(engine: Any) -> list[torch.Tensor]:
    """The torch optimizer's parameters (ZeRO-1/2: its fp32 master partitions) and state tensors."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps a torch optimizer
    out = []
    for group in inner.param_groups:
        for p in group["params"]:
            out.append(p)
            out += [v for _, v in sorted(inner.state.get(p, {}).items()) if isinstance(v, torch.Tensor)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--streaming", action="store_true")
    ap.add_argument("--fault", action="append", default=[])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(None, args.set)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    faults: dict[tuple[str, int], bool] = {}  # (kind, step) -> applies on this rank
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    for spec in args.fault if first_attempt else ():
        kind, _, where = spec.partition("@")
        step, _, r = where.partition(":")
        if int(r) == rank:
            faults[(kind, int(step))] = True
    tag = checkpoint.latest_tag(cfg.checkpoint.dir)
    current = {"step": (int(tag.split("_")[1]) if tag else 0) + 1}  # the step being trained

    def poison(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(module, nn.Embedding) or not module.training:
            return None
        if faults.get(("nan-loss", current["step"])):
            return output * float("nan")
        if faults.get(("inf-grad", current["step"])):
            return _InfGrad.apply(output)
        return None

    nn.modules.module.register_module_forward_hook(poison)

    real_save = torch.save

    def faulty_save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        name = str(f)
        step_dir = Path(name).parent.name
        step = int(step_dir.split("_")[1]) if step_dir.startswith("step_") else -1
        if name.endswith(f"extra_rank{rank}.pt"):
            if faults.get(("kill-save", step)):
                os.kill(os.getpid(), signal.SIGKILL)
            if faults.get(("enospc-save", step)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        else:  # DeepSpeed's own files; the first model-state file, or the optimizer-state file
            kind = {"_model_states.pt": "enospc-model", "_optim_states.pt": "enospc-optim"}.get(name[-16:])
            if kind and faults.pop((kind, step), False):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        real_save(obj, f, *a, **kw)

    torch.save = faulty_save
    engines: list[Any] = []  # the DeepSpeed engine train() builds, for the state digests
    build_engine = train_module.build_engine

    def capture_engine(*a: Any, **kw: Any) -> Any:
        engine, ds_cfg = build_engine(*a, **kw)
        engines.append(engine)
        return engine, ds_cfg

    train_module.build_engine = capture_engine
    args.out.mkdir(parents=True, exist_ok=True)

    def on_step(info: StepResult, model: Any) -> None:
        record = {
            "step": info.step,
            "ids": info.sample_ids,
            "skipped": info.skipped,
            "loss": info.loss,
            "digest": digest(model.parameters()),
            "buffers": digest(b for _, b in sorted(model.named_buffers())),
            "optimizer": digest(optimizer_tensors(engines[0])),
            "lr_schedule": [engines[0].lr_scheduler.last_epoch, engines[0].get_lr()[0]],
        }
        with open(args.out / f"steps_rank{rank}.jsonl", "a") as f:  # closed: complete lines survive a kill
            f.write(json.dumps(record) + "\n")
        current["step"] = info.step + 1
        if faults.get(("kill", info.step)):
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.get(("term", info.step)):
            os.kill(os.getpid(), signal.SIGTERM)
        if faults.get(("pause", info.step)):
            (args.out / f"paused_rank{rank}").touch()
            deadline = time.monotonic() + 120
            while not (args.out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    batches = None if args.streaming else ChainBatches(cfg.data.task, cfg.train.micro_batch_size, rank, world)
    result: dict[str, Any] = {"error_type": None, "error": None}
    try:
        summary = train(cfg, batches, on_step=on_step)
        keep = ("start_step", "end_step", "skipped_steps", "tokens", "tokens_per_s", "preempted")
        result |= {k: getattr(summary, k) for k in keep}
    except Exception as e:  # recorded for the test, which checks the message
        result |= {"error_type": type(e).__name__, "error": str(e)}
    (args.out / f"result_rank{rank}.json").write_text(json.dumps(result))
    print(f"rank {rank} result: {result}", flush=True)
    if dist.is_initialized():  # a rank exiting with a live process group may abort at exit
        if result["error"] is None:  # and together, unless a peer may be gone (a barrier would wait)
            dist.barrier()
        dist.destroy_process_group()
    sys.exit(1 if result["error"] else 0)


if __name__ == "__main__":
    main()
