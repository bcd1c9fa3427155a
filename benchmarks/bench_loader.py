"""Loader throughput beside training consumption: samples/s the streaming loader delivers for a
split (by worker count) and samples/s one training step of the config's model consumes, one run.

    python benchmarks/bench_loader.py --config configs/digit_chain.yaml [--workers 0 1 2]

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


def training_samples_per_s(cfg: Config, batch_size: int, steps: int = 30) -> float:
    """Samples/s one process trains on (fwd+bwd+AdamW at the fixed loop count, answer-position loss)
    with `batch_size` chains per step: what one rank's loader must keep up with."""
    import torch

    from mythos_dist.model import RDT
    from mythos_dist.objective import answer_forward, loss_and_metrics
    from mythos_dist.sweep import chain_batches

    model = RDT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # train-length chains: the id split shares the training length range
    batch = next(chain_batches(cfg, "id", 0, batch_size, batch_size))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss, _ = loss_and_metrics(answer_forward(model, batch, cfg.train.loops.n_loops), batch, cfg.model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts to compare")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads: one rank's share of the cores")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    batch = args.batch_size or cfg.train.micro_batch_size
    print(f"loader throughput, split={args.split}, batch={batch}, shards={cfg.data.remote}")
    consumed = training_samples_per_s(cfg, batch)
    print(f"  training consumes (1 process, {cfg.train.loops.n_loops} loops): {consumed:12,.0f} samples/s")
    for workers in args.workers or [cfg.data.num_workers]:
        rate = loader_samples_per_s(
            cfg, split=args.split, batch_size=batch, num_workers=workers, batches=args.batches
        )
        print(
            f"  workers={workers}: {rate:12,.0f} samples/s  = {rate / consumed:6.1f}x what training consumes"
        )


if __name__ == "__main__":
    main()
