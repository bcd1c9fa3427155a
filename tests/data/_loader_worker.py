"""One rank of the loader tests, launched by torchrun (see test_data_loader_dist.py).

Writes OUT/rank{RANK}.json with the sample ids of every step of:
  full:     one uninterrupted train epoch
  first:    a second loader stopped after --interrupt-at steps, whose state_dict is
  state:    (round-tripped through JSON like a checkpoint)
  resumed:  a third, fresh loader resumed from that state, to the end of the epoch
  eval:     the `id` split, unshuffled
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist

from data_pipeline.loader import make_loader
from mythos_dist.config import load_config


def step_ids(loader, max_steps: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch["sample_id"].tolist())
        if len(out) == max_steps:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--interrupt-at", type=int, required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = load_config(None, args.set).data
    tmp = os.environ["TMPDIR"]  # same on every rank of the node, as cache directories must be

    result = {"full": step_ids(make_loader(data, "train", args.batch))}
    stopped = make_loader(data, "train", args.batch, local=f"{tmp}/cache-first")
    result["first"] = step_ids(stopped, args.interrupt_at)
    result["state"] = json.loads(json.dumps(stopped.state_dict()))
    resumed = make_loader(data, "train", args.batch, state=result["state"], local=f"{tmp}/cache-resumed")
    result["resumed"] = step_ids(resumed)
    result["eval"] = step_ids(make_loader(data, "id", args.batch))

    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
