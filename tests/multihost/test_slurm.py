"""launch/slurm.sbatch on a real two-node SLURM cluster (tests/slurm_cluster.py on the namespace
hosts): `mythos train` trains, a resubmitted job resumes where the first stopped, and `scancel`
mid-run (SIGTERM, then SIGKILL after KillWait) leaves a complete checkpoint that loads."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from mythos_dist.checkpoint import META, export, latest_dir
from mythos_dist.export import load_exported
from tests.multihost.conftest import JOB
from tests.multiproc import REPO, worker_env
from tests.slurm_cluster import SlurmCluster, available

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def slurm(hosts, tmp_path_factory) -> SlurmCluster:
    why = available()
    if why:
        pytest.fail(f"the SLURM test needs Debian's slurm-wlm: {why}")
    with SlurmCluster(hosts, tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit(slurm: SlurmCluster, out: Path, *args: str) -> str:
    """sbatch on node0 with the test's environment (one thread, node-local TMPDIR); the job id."""
    env = worker_env(out, SLURM_CONF=str(slurm.conf), TMPDIR=str(slurm.hosts[0].local))
    cmd = ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={out}/slurm-%j.out", f"--chdir={REPO}",
           "launch/slurm.sbatch", "--config", "configs/digit_chain.yaml", *args]  # fmt: skip
    r = slurm.hosts[0].run(cmd, env=env)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_out(out: Path, job: str) -> str:
    f = out / f"slurm-{job}.out"
    return f.read_text(errors="replace") if f.exists() else ""


@pytest.fixture(scope="module")
def jobs(slurm: SlurmCluster, shards: list[str], tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("jobs")
    sets = [a for s in [*JOB, *shards, f"checkpoint.dir={tmp / 'ckpt'}"] for a in ("--set", s)]
    first = submit(slurm, tmp, *sets, "--stop-after", "4")  # a job that fits half of the run
    slurm.wait_done(first, timeout=300)
    second = submit(slurm, tmp, *sets)  # the same job submitted again
    slurm.wait_done(second, timeout=300)

    # a long run without periodic checkpoints, cancelled once it trains
    long = [a for s in [*JOB, *shards, "train.steps=100000", "checkpoint.every=0", f"checkpoint.dir={tmp / 'ckpt_cancel'}"]
            for a in ("--set", s)]  # fmt: skip
    cancelled = submit(slurm, tmp, *long)
    deadline = time.monotonic() + 300
    while not re.search(r"step [3-9]\d*/100000", job_out(tmp, cancelled)):
        assert time.monotonic() < deadline and slurm.job_state(cancelled) in ("PENDING", "RUNNING"), (
            job_out(tmp, cancelled) + slurm.logs()
        )
        time.sleep(0.5)
    slurm.run(["scancel", cancelled])
    t0 = time.monotonic()
    slurm.wait_done(cancelled, timeout=120)
    return {
        "tmp": tmp,
        "first": first,
        "second": second,
        "cancelled": cancelled,
        "cancel_s": time.monotonic() - t0,
    }


def test_sbatch_trains_and_resubmission_resumes(jobs: dict[str, Any]) -> None:
    tmp = jobs["tmp"]
    first, second = job_out(tmp, jobs["first"]), job_out(tmp, jobs["second"])
    assert "step 4/8" in first and "step 5/8" not in first, first
    assert "done: step 4" in first, first
    assert f"resumed from {tmp / 'ckpt'} at step 4" in second, second
    assert "step 4/8" not in second and "done: step 8" in second, second
    assert "rendezvous node0:29500" in first and "collectives on mgmt0" in first  # both nodes
    assert first.count("torchrun_multinode: node") == 2 and "node1: rendezvous" in first


def test_scancel_leaves_a_loadable_checkpoint(jobs: dict[str, Any]) -> None:
    tmp, out = jobs["tmp"], job_out(jobs["tmp"], jobs["cancelled"])
    print(f"scancel: job gone {jobs['cancel_s']:.1f} s after scancel")
    saved = re.search(r"step (\d+): SIGTERM: saved (\S+), stopping", out)
    assert saved, out
    step_dir = latest_dir(tmp / "ckpt_cancel")
    assert step_dir is not None and step_dir.name == f"step_{int(saved.group(1)):08d}"
    assert (step_dir / META).is_file()
    model = load_exported(export(step_dir, tmp / "cancel_export"))
    assert sum(p.numel() for p in model.parameters()) > 0
