"""One rank of a multi-rank evaluation, launched by torch.distributed.run (gloo on CPU).

Usage: _eval_worker.py CONFIG_YAML OUT_DIR. Each rank builds the same seeded model, evaluates its
share of the samples and writes its own chunks of the shared zarr store (see mythos_dist.evaluate).
"""

import sys
from datetime import timedelta

import torch.distributed as dist

from mythos_dist.config import load_config
from mythos_dist.evaluate import run_eval
from mythos_dist.loading import load_model


def main(config: str, out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        cfg = load_config(config)
        res = run_eval(load_model(None, cfg), cfg, out_dir=out_dir)
        assert (res is None) == (dist.get_rank() != 0)
        dist.barrier()  # leave together: a rank exiting with a live process group may abort a peer
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
