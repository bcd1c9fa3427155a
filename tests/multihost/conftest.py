"""Namespace hosts (tests/hosts.py) shared by the multi-host and SLURM tests: one pair per session,
removed at its end (also when tests fail). Needs root, iproute2 and util-linux (.ci/run installs
them); without them the tests fail with the reason instead of passing unseen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hosts import Hosts, available
from tests.multiproc import worker_env
from tests.reliability._common import SHARD_DATA, TINY, WORKER

TIMEOUT_S = 20  # parallel.timeout_s of these jobs: a silent link must end them within TIMEOUT_S + 15 s
JOB = [*TINY, "train.steps=8", "checkpoint.every=2", "parallel.ep_size=2", "parallel.zero_stage=1",
       f"parallel.timeout_s={TIMEOUT_S}"]  # fmt: skip
_ports = iter(range(29400, 30000))


def next_port() -> int:
    return next(_ports)


@pytest.fixture(scope="session")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    why = available()
    if why:
        pytest.fail(f"multi-host tests need namespace hosts: {why}")
    with Hosts(tmp_path_factory.mktemp("hosts"), 2) as h:
        yield h


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """MDS shards on the shared file system; the `--set`s that point a job at them."""
    from data_pipeline.shards import build
    from mythos_dist.config import load_config

    data = [*SHARD_DATA, f"data.remote={tmp_path_factory.mktemp('data') / 'shards'}"]
    build(load_config(None, data).data)
    return data


def launch(
    hosts: Hosts,
    out: Path,
    sets: list[str],
    *faults: str,
    nnodes: int = 2,
    nproc: int = 1,
    max_restarts: int = 0,
) -> list[subprocess.Popen]:
    """One training job of tests/reliability/_worker.py (streaming loader) started with
    launch/torchrun_multinode.sh on hosts 0..nnodes-1, MASTER = host 0's fast0 address (not the
    address its hostname resolves to). Logs in out/node<i>.log."""
    out.mkdir(parents=True, exist_ok=True)
    port = next_port()
    program = [str(WORKER), str(out), "--streaming", *(a for f in faults for a in ("--fault", f))]
    procs = []
    for h in hosts.hosts[:nnodes]:
        env = worker_env(
            h.local,
            NNODES=str(nnodes),
            NPROC_PER_NODE=str(nproc),
            MASTER=f"{hosts[0].addr('fast0')}:{port}",
            RDZV_ID=f"{out.name}-{port}",
            MAX_RESTARTS=str(max_restarts),
            PROGRAM=" ".join(program),
            PYTHON=sys.executable,
        )
        args = ["launch/torchrun_multinode.sh", *(a for s in sets for a in ("--set", s))]
        procs.append(h.popen(args, out / f"node{h.index}.log", env))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    """Wait for every process (seconds from now until each ended); kill them all on timeout."""
    t0, ended = time.monotonic(), {}
    try:
        while len(ended) < len(procs):
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"still running after {timeout} s: nodes {sorted(set(range(len(procs))) - set(ended))}"
                )
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [ended[i] for i in range(len(procs))]


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"{path.name} never appeared\n{node_logs(path.parent)}")
        time.sleep(0.1)


def node_logs(out: Path) -> str:
    return "".join(f"--- {f.name}\n{f.read_text()[-4000:]}\n" for f in sorted(out.glob("node*.log")))


def records(out: Path, rank: int) -> list[list[dict[str, Any]]]:
    """The steps a rank recorded, split into the attempts of the launch (the step count restarts)."""
    f = out / f"steps_rank{rank}.jsonl"
    assert f.is_file(), f"no {f.name}\n{node_logs(out)}"
    attempts: list[list[dict[str, Any]]] = []
    for line in f.read_text().splitlines():
        r = json.loads(line)
        if not attempts or r["step"] <= attempts[-1][-1]["step"]:
            attempts.append([])
        attempts[-1].append(r)
    return attempts


def result(out: Path, rank: int) -> dict[str, Any]:
    f = out / f"result_rank{rank}.json"
    assert f.is_file(), f"no {f.name}\n{node_logs(out)}"
    return json.loads(f.read_text())


def assert_samples_like(trained: dict[int, list[dict[str, Any]]], ref: Path, steps: int = 8) -> None:
    """Per rank, the steps kept across interruptions train the reference run's samples in its order:
    none lost, none repeated, and the same losses."""
    import torch

    ids = []
    for rank, recs in trained.items():
        want = records(ref, rank)[0]
        assert [r["step"] for r in recs] == list(range(1, steps + 1))
        assert [r["ids"] for r in recs] == [r["ids"] for r in want]
        torch.testing.assert_close([r["loss"] for r in recs], [r["loss"] for r in want], rtol=1e-5, atol=1e-6)
        ids += [i for r in recs for i in r["ids"]]
    assert len(ids) == len(set(ids)) == steps * len(trained) * 8  # micro batch 8
