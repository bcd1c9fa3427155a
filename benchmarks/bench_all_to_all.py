"""One expert-parallel exchange in isolation: gloo all_to_all_single of ROWS x 64 fp32 rows, half
kept and half sent to the peer, against isend/irecv of the same half and against the local-socket
all-to-all (mythos_dist.ep_transport, parallel.ep_transport=auto); also the 8 int64 expert counts
each forward loop exchanges first. 2 processes, balanced, no compute in between (what a call costs
without waiting for a slower rank).

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_all_to_all.py [ROWS]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from mythos_dist.ep_transport import LocalSocketAllToAll


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, rows = dist.get_rank(), int(sys.argv[1]) if len(sys.argv) > 1 else 1100
    x, half = torch.randn(rows, 64), rows // 2
    sockets = LocalSocketAllToAll.connect(None, timeout_s=60)
    assert sockets is not None, "the two processes are not on one host"
    counts = torch.arange(8)

    def all_to_all() -> None:
        splits = [half, rows - half]
        dist.all_to_all_single(torch.empty(rows, 64), x, splits, splits)

    def all_to_all_sockets() -> None:
        splits = [half, rows - half]
        sockets(torch.empty(rows, 64), x, splits, splits)

    def counts_gloo() -> None:
        dist.all_to_all_single(torch.empty(8, dtype=torch.long), counts)

    def counts_sockets() -> None:
        sockets(torch.empty(8, dtype=torch.long), counts)

    def send_recv() -> None:
        out = torch.empty(rows, 64)
        out[:half] = x[:half]
        reqs = [dist.isend(x[half:].contiguous(), 1 - rank), dist.irecv(out[half:], 1 - rank)]
        for r in reqs:
            r.wait()

    cases = [
        (f"gloo all_to_all_single {rows} x 64 fp32", all_to_all),
        (f"gloo isend/irecv {rows} x 64 fp32", send_recv),
        (f"local sockets {rows} x 64 fp32", all_to_all_sockets),
        ("gloo all_to_all_single 8 int64", counts_gloo),
        ("local sockets 8 int64", counts_sockets),
    ]
    for name, fn in cases * 2:
        for _ in range(50):
            fn()
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(1000):
            fn()
        wall, cpu = (time.perf_counter() - wall) / 1e3, (time.process_time() - cpu) / 1e3
        if rank == 0:
            print(f"{name:<36} wall {wall * 1e6:6.1f} us, cpu {cpu * 1e6:6.1f} us per call")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
