"""Multi-node training on two namespace hosts (own address, hostname, /dev/shm, node-local cache),
launched with launch/torchrun_multinode.sh and MASTER = the first host's second-interface address.

The reference is one node × 2 processes; the 2-node job must train identically (samples, losses,
parameters). Then the faults a cluster sees, each followed by a relaunch that must continue exactly
like the reference (no sample lost or repeated): a silently cut link (both nodes end within
parallel.timeout_s + 15 s with one clear line), SIGTERM (checkpoint at the next step boundary), and
a SIGKILLed rank under torchrun's --max-restarts (restarted and resumed without anyone acting).
Last, launch/deepspeed_hostfile.sh: the DeepSpeed launcher reaching both hosts with pdsh over ssh.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mythos_dist.checkpoint import latest_tag
from tests.multihost.conftest import (
    JOB,
    TIMEOUT_S,
    assert_samples_like,
    launch,
    next_port,
    node_logs,
    records,
    result,
    wait_all,
    wait_for,
)
from tests.multiproc import REPO, worker_env

pytestmark = pytest.mark.distributed

# what every surviving rank prints when its peer went silent: from the heartbeat watchdog, or as the
# error of the collective that timed out (_worker.py prints it in its result line)
STUCK_LINE = re.compile(
    r"rank (\d) on node(\d): step (\d+), [^,]+, (?:blocked|failed) in collective (\w+) \(called from "
    rf"mythos_dist/[^)]+\): .* \(parallel\.timeout_s={TIMEOUT_S}\): a peer is unreachable, stopped or dead"
)


def job(tmp: Path, name: str, shards: list[str]) -> list[str]:
    return [*JOB, *shards, f"checkpoint.dir={tmp / 'ckpt' / name}"]


@pytest.fixture(scope="module")
def ref(hosts, shards, tmp_path_factory) -> dict[str, Any]:
    """1 node × 2 processes (node0) and 2 nodes × 1 process: the same job, to the end."""
    tmp = tmp_path_factory.mktemp("nodes")
    runs: dict[str, Any] = {"tmp": tmp}
    for name, nnodes, nproc in (("one_node", 1, 2), ("two_nodes", 2, 1)):
        procs = launch(hosts, tmp / name, job(tmp, name, shards), nnodes=nnodes, nproc=nproc)
        wait_all(procs, timeout=240)
        runs[name] = tmp / name
        runs[f"{name}_rc"] = [p.returncode for p in procs]
    return runs


def test_two_nodes_train_like_one_node_two_processes(ref: dict[str, Any]) -> None:
    one, two = ref["one_node"], ref["two_nodes"]
    assert ref["one_node_rc"] == [0], node_logs(one)
    assert ref["two_nodes_rc"] == [0, 0], node_logs(two)  # torchrun's exit status: every rank succeeded
    for rank in (0, 1):
        assert result(two, rank)["end_step"] == 8
        [want], [got] = records(one, rank), records(two, rank)
        assert [r["ids"] for r in got] == [r["ids"] for r in want]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=1e-7)
        assert [r["digest"] for r in got] == [r["digest"] for r in want]  # parameters, bit for bit
    hostnames = {result_host(two, r) for r in (0, 1)}
    assert hostnames == {"node0", "node1"}
    # the same bytes over local sockets on one host and over gloo between two (parallel.ep_transport)
    assert "all-to-all over local Unix sockets (2 ranks on this host)" in (one / "node0.log").read_text()
    assert "all-to-all over the process group (gloo)" in (two / "node0.log").read_text()


def result_host(out: Path, rank: int) -> str:
    """The host a rank ran on, from the launcher lines in the node logs."""
    for log in out.glob("node*.log"):
        if f"rank {rank} result:" in log.read_text():
            return log.stem
    raise AssertionError(f"no result line of rank {rank}\n{node_logs(out)}")


def test_master_is_an_address_of_a_second_interface(hosts, ref: dict[str, Any]) -> None:
    """torch alone would not host the rendezvous store for this MASTER (it matches neither node0's
    hostname nor the address that resolves to); the launcher says is_host and the job ran."""
    probe = "from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname as m; print(m(sys.argv[1]))"
    r = hosts[0].run([sys.executable, "-c", f"import sys; {probe}", hosts[0].addr("fast0")])
    assert r.stdout.strip() == "False", r.stderr
    log0 = (ref["two_nodes"] / "node0.log").read_text()
    assert f"rendezvous {hosts[0].addr('fast0')}:" in log0 and "(--rdzv_conf=is_host=1)" in log0
    assert (
        "collectives on fast0" in log0
        and "collectives on fast0" in (ref["two_nodes"] / "node1.log").read_text()
    )


@pytest.fixture(scope="module")
def cut(hosts, shards, ref) -> dict[str, Any]:
    """Rank 1 pauses after step 3; node1's cable is pulled; both nodes must end on their own. Then
    the link comes back and the same job is launched again."""
    tmp = ref["tmp"]
    sets, out = job(tmp, "cut", shards), tmp / "cut"
    procs = launch(hosts, out, sets, "pause@3:1")
    try:
        wait_for(out / "paused_rank1", procs)
        hosts.cut(1)
        (out / "go").touch()
        ended = wait_all(procs, timeout=TIMEOUT_S + 90)
    finally:
        hosts.restore(1)
    latest = latest_tag(tmp / "ckpt" / "cut")
    again = tmp / "cut_again"
    relaunched = launch(hosts, again, sets)
    wait_all(relaunched, timeout=240)
    return {"out": out, "ended_s": ended, "latest": latest, "again": again,
            "rc_again": [p.returncode for p in relaunched]}  # fmt: skip


def test_cut_link_ends_both_nodes_within_timeout(cut: dict[str, Any]) -> None:
    out = cut["out"]
    print(f"cut link: nodes ended {cut['ended_s'][0]:.1f} s / {cut['ended_s'][1]:.1f} s after the cut")
    assert max(cut["ended_s"]) < TIMEOUT_S + 15, node_logs(out)
    for node in (0, 1):
        lines = [m for m in STUCK_LINE.finditer((out / f"node{node}.log").read_text())]
        assert len(lines) == 1, node_logs(out)  # one line per rank, each node runs one rank
        _rank, on, step, _collective = lines[0].groups()
        assert on == str(node) and step == "3", lines[0].group(0)  # rank 1 paused after step 3
    assert cut["latest"] == "step_00000002"  # step 3 was trained but never checkpointed


def test_relaunch_after_cut_link_resumes_without_losing_samples(ref, cut: dict[str, Any]) -> None:
    assert cut["rc_again"] == [0, 0], node_logs(cut["again"])
    trained = {}
    for rank in (0, 1):
        [first], [again] = records(cut["out"], rank), records(cut["again"], rank)
        assert again[0]["step"] == 3
        trained[rank] = [r for r in first if r["step"] <= 2] + again
    assert_samples_like(trained, ref["one_node"])


@pytest.fixture(scope="module")
def preempted(hosts, shards, ref) -> dict[str, Any]:
    """SIGTERM to both torchrun agents (as SLURM sends at the time limit) while rank 1 is in step 3."""
    tmp = ref["tmp"]
    sets, out = job(tmp, "term", shards), tmp / "term"
    procs = launch(hosts, out, sets, "pause@3:1")
    wait_for(out / "paused_rank1", procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    time.sleep(1)  # the agents forward it to their ranks
    (out / "go").touch()
    ended = wait_all(procs, timeout=90)
    latest = latest_tag(tmp / "ckpt" / "term")
    again = tmp / "term_again"
    relaunched = launch(hosts, again, sets)
    wait_all(relaunched, timeout=240)
    return {"out": out, "ended_s": ended, "latest": latest, "again": again,
            "rc_again": [p.returncode for p in relaunched]}  # fmt: skip


def test_sigterm_checkpoints_at_next_step_boundary_and_resumes(ref, preempted: dict[str, Any]) -> None:
    out = preempted["out"]
    print(f"SIGTERM: nodes ended {preempted['ended_s'][0]:.1f} s / {preempted['ended_s'][1]:.1f} s after it")
    for rank in (0, 1):
        r = result(out, rank)
        assert r["error"] is None and r["preempted"] and r["end_step"] == 3, node_logs(out)
    assert preempted["latest"] == "step_00000003"
    assert "step 3: SIGTERM: saved" in node_logs(out)
    assert preempted["rc_again"] == [0, 0], node_logs(preempted["again"])
    trained = {}
    for rank in (0, 1):
        [first], [again] = records(out, rank), records(preempted["again"], rank)
        assert [r["step"] for r in first] == [1, 2, 3] and again[0]["step"] == 4
        trained[rank] = first + again
    assert_samples_like(trained, ref["one_node"])


def test_elastic_restart_after_sigkill_resumes_by_itself(hosts, shards, ref) -> None:
    """--max-restarts=1: rank 1 SIGKILLs itself after step 3; torchrun restarts both nodes' ranks,
    which resume from step 2 and finish; the launch succeeds without any action."""
    tmp = ref["tmp"]
    out = tmp / "elastic"
    procs = launch(hosts, out, job(tmp, "elastic", shards), "kill@3:1", max_restarts=1)
    took = wait_all(procs, timeout=300)
    print(f"elastic restart: launch to the end (8 steps, one restart) {max(took):.0f} s")
    assert [p.returncode for p in procs] == [0, 0], node_logs(out)
    trained = {}
    for rank in (0, 1):
        attempts = records(out, rank)
        assert len(attempts) == 2, node_logs(out)
        assert attempts[1][0]["step"] == 3  # resumed from the step-2 checkpoint
        trained[rank] = [r for r in attempts[0] if r["step"] <= 2] + attempts[1]
        assert result(out, rank)["end_step"] == 8
    assert [r["step"] for r in records(out, 1)[0]] == [1, 2, 3]
    assert_samples_like(trained, ref["one_node"])


def test_deepspeed_hostfile_launch_over_ssh_trains_like_one_node(hosts, shards, ref) -> None:
    """launch/deepspeed_hostfile.sh on node0, hostfile `node0 slots=1` + `node1 slots=1`: DeepSpeed's
    runner pdsh-es over ssh into both hosts and `mythos train` runs there, with an empty config file
    (so the job is the reference's: defaults + the same --set): the reference's losses and export."""
    from safetensors.torch import load_file

    tmp = ref["tmp"]
    out = tmp / "deepspeed"
    out.mkdir()
    hosts.start_ssh()
    (out / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    (out / "defaults.yaml").write_text("{}\n")
    # remote nodes get only NCCL_*/PYTHON*/UCX*/MV2* and the lines of this file (launcher header)
    env_file = out / "deepspeed_env"
    env_file.write_text(
        f"OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\nTMPDIR={hosts[0].local}\n"
        f"TORCH_EXTENSIONS_DIR={REPO / '.venv' / 'torch_extensions'}\n"
    )
    env = worker_env(hosts[0].local, HOSTFILE=str(out / "hostfile"), DS_ENV_FILE=str(env_file),
                     MASTER_PORT=str(next_port()))  # fmt: skip
    sets = [a for s in job(tmp, out.name, shards) for a in ("--set", s)]
    proc = hosts[0].popen(["launch/deepspeed_hostfile.sh", "--config", str(out / "defaults.yaml"), *sets],
                          out / "node0.log", env)  # fmt: skip
    wait_all([proc], timeout=240)
    log = (out / "node0.log").read_text()
    assert proc.returncode == 0, log
    assert "Running on the following workers: node0,node1" in log
    assert "nnodes=2" in log and "node1: " in log and "node_rank=1" in log
    losses = [float(x) for x in re.findall(r"node0: step \d+/8  loss (\d+\.\d+)", log)]
    want = [r["loss"] for r in records(ref["one_node"], 0)[0]]  # the mean over ranks, as printed
    assert losses == pytest.approx(want, abs=6e-5)  # printed with 4 decimals
    assert "node0: done: step 8" in log
    a, b = (
        load_file(str(tmp / "ckpt" / name / "export" / "model.safetensors"))
        for name in ("one_node", out.name)
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
