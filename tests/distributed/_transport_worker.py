"""Worker for the local-socket all-to-all tests (mythos_dist.ep_transport), under torchrun.

_transport_worker.py OUT CASE   writes OUT/rank<r>.json: {"transport": class name, ...}
CASE: "match"    random uneven splits (zeros, a message over the socket buffer, bf16 / int64 /
                 multi-dim rows) against gloo's all_to_all_single on the same inputs: "max_diff"
      "mismatch" rank 0 sends rank 1 one row more than rank 1 expects: "error"
      "exit"     rank 1 exits without joining the exchange: rank 0's "error" and "waited_s"
      "exit_forked"  the same, rank 1 leaving behind a forked child that lives 20 s more
      "stall"    rank 1 joins 3 s late, rank 0 gives up after 1 s: "error", "waited_s"
      "process_group"  parallel.ep_transport=process_group
      "auto"     only the transport auto picks
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mythos_dist.ep_transport import all_to_all_for


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    timeout = 1.0 if case == "stall" else 60.0
    exchange = all_to_all_for(None, "process_group" if case == "process_group" else "auto", timeout)
    res: dict = {"transport": type(exchange).__name__}
    if case == "match":
        worst = 0.0
        shapes = [(64,), (3, 5), ()]
        for trial in range(40):
            # Every rank draws the full split matrix from the same seed: send[r][s] rows r -> s.
            gen = torch.Generator().manual_seed(trial)
            # 10 MB from every rank to every other: more than a socket's buffers hold (2 × 4 MB), so
            # blocking sends both ways at once would deadlock
            big = trial == 7
            send = (
                torch.full((size, size), 40_000) if big else torch.randint(0, 30, (size, size), generator=gen)
            )
            if trial % 4 == 1:
                send[0, size - 1] = 0
            dtype = torch.float32 if big else [torch.float32, torch.bfloat16, torch.int64][trial % 3]
            row = (64,) if big else shapes[trial % len(shapes)]
            x = (torch.randn(int(send[rank].sum()), *row) * 100).to(dtype)
            in_splits, out_splits = send[rank].tolist(), send[:, rank].tolist()
            want = torch.empty(sum(out_splits), *row, dtype=dtype)
            dist.all_to_all_single(want, x, out_splits, in_splits)
            got = torch.full_like(want, -7)
            exchange(got, x, out_splits, in_splits)
            worst = max(worst, float((got.double() - want.double()).abs().max()) if got.numel() else 0.0)
        equal = torch.zeros(8 * size)  # splits None: equal parts
        exchange(equal, torch.arange(8 * size, dtype=torch.float32) + 100 * rank)
        res |= {"max_diff": worst, "equal_splits": equal.tolist(), "trials": trial + 1}
    elif case == "mismatch":
        x = torch.ones(3 if rank == 0 else 2, 4)
        in_splits = [1, 2] if rank == 0 else [1, 1]  # rank 0 sends 2 rows, rank 1 expects 1
        out_splits = [1, 1]
        try:
            exchange(torch.empty(sum(out_splits), 4), x, out_splits, in_splits)
            res["error"] = None
        except RuntimeError as e:
            res["error"] = str(e)
    elif case in ("exit", "exit_forked", "stall"):
        if rank == 1:
            if case == "exit_forked" and os.fork() == 0:  # a child that outlives it, as a DataLoader
                time.sleep(20)  # worker can: it must not hold the sockets open
                os._exit(0)
            if case.startswith("exit"):
                os._exit(0)  # gone, without a word
            time.sleep(3)
        t = time.monotonic()
        try:
            exchange(torch.empty(2, 4), torch.ones(2, 4))
            res["error"] = None
        except RuntimeError as e:
            res["error"] = str(e)
        res["waited_s"] = time.monotonic() - t
        if case.startswith("exit"):  # the peer is gone: no barrier, no clean shutdown with it
            (out / f"rank{rank}.json").write_text(json.dumps(res))
            os._exit(0)
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
