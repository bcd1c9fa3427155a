"""Launching the fault-injecting worker: each rank a plain process (no torchrun agent, which would
kill the surviving ranks itself and so hide how they fail on their own), and reading its records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.multiproc import REPO, TINY_MODEL, free_port, worker_env

WORKER = Path(__file__).with_name("_worker.py")
TINY = TINY_MODEL
# Small MDS shards for jobs on the real streaming loader; num_workers=0: no DataLoader worker start-up.
SHARD_DATA = [
    "data.task.n_train=256",
    "data.task.n_eval=16",
    "data.samples_per_shard=64",
    "data.build_workers=1",
    "data.num_workers=0",
]


def start_ranks(tmp: Path, out: Path, nproc: int, *args: str, sets: list[str] = ()) -> list[subprocess.Popen]:
    """Start rank 0..nproc-1 of one job (logs in out/log_rank<r>.txt); nproc=1: no process group env."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), str(out), *args, *(a for s in (*TINY, *sets) for a in ("--set", s))]
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        extra = {}
        if nproc > 1:
            extra = dict(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        env = worker_env(tmp, **extra)
        with open(out / f"log_rank{rank}.txt", "w") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def run_ranks(
    tmp: Path, out: Path, nproc: int, *args: str, sets: list[str] = (), timeout: float = 240
) -> list[int]:
    """Run one job to the end; returns the exit codes, each checked against the rank's record:
    0 when train() returned, 1 when it raised; a rank with no record must have died (non-zero)."""
    procs = start_ranks(tmp, out, nproc, *args, sets=sets)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    for rank, rc in enumerate(codes):
        record = out / f"result_rank{rank}.json"
        if record.is_file():
            want = 1 if json.loads(record.read_text())["error"] else 0
            assert rc == want, f"rank {rank}: exit code {rc}, its record says {want}\n{logs(out)}"
        else:
            assert rc != 0, f"rank {rank}: exit code 0 but no {record.name}\n{logs(out)}"
    return codes


def logs(out: Path) -> str:
    return "".join(f"--- {f.name}\n{f.read_text()[-3000:]}\n" for f in sorted(out.glob("log_rank*.txt")))


def steps(out: Path, rank: int) -> list[dict[str, Any]]:
    f = out / f"steps_rank{rank}.jsonl"
    assert f.is_file(), f"no {f.name}\n{logs(out)}"
    return [json.loads(line) for line in f.read_text().splitlines()]


def result(out: Path, rank: int) -> dict[str, Any]:
    f = out / f"result_rank{rank}.json"
    assert f.is_file(), f"no {f.name}\n{logs(out)}"
    return json.loads(f.read_text())
