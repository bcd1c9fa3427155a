"""Loader throughput: samples/s that the streaming loader delivers for a split, by worker count.

    python benchmarks/bench_loader.py [--config X] [--set k=v ...] [--workers 0 1 2] [--batches 200]

Builds the shards first if they are missing (a no-op when an identical verified build is in place).
The rate excludes the first batches (worker start-up, first shard copies into the local cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from data_pipeline.loader import make_loader
from data_pipeline.shards import build
from mythos_dist.config import Config, load_config


def loader_samples_per_s(
    cfg: Config,
    *,
    split: str = "train",
    batch_size: int | None = None,
    num_workers: int | None = None,
    batches: int = 200,
    warmup_batches: int = 5,
) -> float:
    """Samples per second over `batches` batches after `warmup_batches` (fewer if the epoch ends).

    batch_size defaults to train.micro_batch_size, num_workers to data.num_workers.
    """
    data = dataclasses.replace(
        cfg.data, num_workers=cfg.data.num_workers if num_workers is None else num_workers
    )
    build(data)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as local:  # own cache: loaders may coexist
        loader = make_loader(data, split, batch_size or cfg.train.micro_batch_size, local=local)
        it = iter(loader)
        for _ in range(warmup_batches):
            next(it)
        n, t0 = 0, time.perf_counter()
        for i, batch in enumerate(it):
            n += len(batch["sample_id"])
            if i + 1 == batches:
                break
        seconds = time.perf_counter() - t0
        # Stop before the cache directory goes. Workers stop with the iterator; with num_workers=0
        # streaming's download threads run in this process and keep filling the cache unless told.
        if not data.num_workers:
            loader.dataset._iterator.exit()
        del it, loader
    return n / seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts to compare")
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    batch = args.batch_size or cfg.train.micro_batch_size
    print(f"loader throughput, split={args.split}, batch={batch}, shards={cfg.data.remote}")
    for workers in args.workers or [cfg.data.num_workers]:
        rate = loader_samples_per_s(
            cfg, split=args.split, batch_size=batch, num_workers=workers, batches=args.batches
        )
        print(f"  workers={workers}: {rate:12,.0f} samples/s")


if __name__ == "__main__":
    main()
