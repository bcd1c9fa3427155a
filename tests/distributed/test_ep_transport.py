"""The expert-parallel all-to-all over local Unix sockets (mythos_dist.ep_transport), between real
processes: the same bytes as gloo's all_to_all_single, and failures that end in a clear error
instead of a hang. Training with it is compared with the process group's in
test_training_distributed (bit-identical losses); across namespace hosts, where it must not be
used, in tests/multihost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import free_port, run_torchrun, worker_env

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_transport_worker.py")


def ranks(tmp: Path, case: str, nproc: int = 2) -> list[dict]:
    out = tmp / case
    out.mkdir()
    run_torchrun(WORKER, nproc, [str(out), case], env=worker_env(tmp), timeout=120)
    return [
        json.loads((out / f"rank{r}.json").read_text())
        for r in range(nproc)
        if (out / f"rank{r}.json").exists()
    ]


@pytest.mark.parametrize("nproc", [2, 3])
def test_local_sockets_move_the_same_bytes_as_gloo(tmp_path: Path, nproc: int) -> None:
    res = ranks(tmp_path, "match", nproc)
    assert len(res) == nproc
    for r, got in enumerate(res):
        assert got["transport"] == "LocalSocketAllToAll"
        assert got["max_diff"] == 0.0 and got["trials"] == 40
        # equal splits: part r of every sender s, in sender order
        assert got["equal_splits"] == [100 * s + 8 * r + i for s in range(nproc) for i in range(8)]


def test_process_group_transport_is_kept_when_asked(tmp_path: Path) -> None:
    assert [r["transport"] for r in ranks(tmp_path, "process_group")] == ["ProcessGroupAllToAll"] * 2


def test_ranks_that_disagree_on_sizes_get_an_error_not_garbage(tmp_path: Path) -> None:
    r0, r1 = ranks(tmp_path, "mismatch")
    assert r0["error"] is None  # its own rows arrived as it expected
    assert "EP rank 0 sends 32 bytes, EP rank 1 expects 16" in r1["error"]
    assert "disagree on the splits" in r1["error"]


@pytest.mark.parametrize("case", ["exit", "exit_forked"])
def test_a_peer_that_exits_fails_the_exchange_at_once(tmp_path: Path, case: str) -> None:
    """Also when the peer forked a child that lives on (a DataLoader worker): the child must not
    keep the peer's sockets open."""
    [r0] = ranks(tmp_path, case)
    assert r0["error"] is not None and "EP rank 1" in r0["error"], r0
    assert r0["waited_s"] < 10  # its socket closed: no wait for the 60 s timeout (nor the child's 20 s)


def test_a_silent_peer_fails_the_exchange_after_the_timeout(tmp_path: Path) -> None:
    r0, r1 = ranks(tmp_path, "stall")
    assert "waited 1 s (parallel.timeout_s) for EP rank(s) 1" in r0["error"]
    assert 0.9 < r0["waited_s"] < 2.9
    assert r1["error"] is None  # rank 0's rows were already in its socket


def test_ranks_on_different_hosts_use_the_process_group(tmp_path: Path) -> None:
    """Two ranks with different hostnames (UTS namespaces, root only) in one network namespace:
    they could reach each other's sockets, but they stand for two hosts, so auto keeps gloo."""
    out = tmp_path / "hosts"
    out.mkdir()
    env = worker_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = []
    for r in range(2):
        cmd = [
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname h{r} && exec "$0" "$@"',
            sys.executable,
            str(WORKER),
        ]
        procs.append(
            subprocess.Popen([*cmd, str(out), "auto"], env=env | {"RANK": str(r), "LOCAL_RANK": "0"})
        )
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    transports = [json.loads((out / f"rank{r}.json").read_text())["transport"] for r in range(2)]
    assert transports == ["ProcessGroupAllToAll"] * 2
