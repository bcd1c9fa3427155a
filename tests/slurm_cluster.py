"""A real SLURM cluster on namespace hosts (tests/hosts.py): munged (own key and socket), slurmctld on
node0, one slurmd per host, Debian's slurm-wlm 22.05. No cgroups (proctrack/linuxproc, task/none),
no accounting. Client commands run on node0 (`SlurmCluster.run`) with SLURM_CONF set.
Everything lives in one directory; `close()` stops munged (the daemons on the hosts end with them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.hosts import Hosts, UpDown

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")


def available() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge)"
    return None


class SlurmCluster(UpDown):
    def __init__(self, hosts: Hosts, root: Path):
        self.hosts, self.root = hosts, Path(root)
        self.conf = self.root / "slurm.conf"
        self.munged: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def up(self, timeout: float = 90) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o700)  # munged refuses keys and sockets in directories others can write
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = r / "munge.socket"
        self.munged = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}", f"--seed-file={r / 'munge.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # see munged.log
        )  # fmt: skip
        nodes = "\n".join(
            f"NodeName={h.hostname} NodeAddr={h.addr('mgmt0')} CPUs=2 State=UNKNOWN" for h in self.hosts.hosts
        )
        head = self.hosts[0]
        self.conf.write_text(f"""\
ClusterName=mythostest
SlurmctldHost={head.hostname}({head.addr("mgmt0")})
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=30
InactiveLimit=0
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        for d in ["state", *(f"spool-{h.hostname}" for h in self.hosts.hosts)]:
            (r / d).mkdir(exist_ok=True)
        self._wait(lambda: self.socket.exists(), timeout, "munged socket")
        env = self.env()
        head.popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], r / "slurmctld.out", env)
        for h in self.hosts.hosts:
            h.popen(
                ["slurmd", "-D", "-f", str(self.conf), "-N", h.hostname], r / f"slurmd-{h.hostname}.out", env
            )
        want = len(self.hosts)
        self._wait(lambda: self.idle_nodes() == want, timeout, f"{want} idle nodes")

    def idle_nodes(self) -> int:
        r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return sum(line.strip() == "idle" for line in r.stdout.splitlines())

    def run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scancel, ...) on node0."""
        r = self.hosts[0].run(argv, timeout=timeout, env=self.env())
        if check and r.returncode:
            raise AssertionError(f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}\n{self.logs()}")
        return r

    def job_state(self, job: str) -> str:
        """PENDING, RUNNING, ..., or '' once the controller has forgotten it."""
        r = self.run(["squeue", "-h", "-j", job, "-o", "%T"], check=False)
        return r.stdout.strip()

    def wait_done(self, job: str, timeout: float) -> None:
        self._wait(
            lambda: self.job_state(job) in ("", "COMPLETED", "FAILED", "CANCELLED"), timeout, f"job {job}"
        )

    def logs(self) -> str:
        return "".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}\n"
            for f in sorted(self.root.glob("*.log"))
        )

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise AssertionError(f"SLURM test cluster: no {what} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop munged; the SLURM daemons run on the hosts, whose `close` kills them."""
        for h in self.hosts.hosts:
            for daemon in ("slurmd", "slurmctld"):
                pid = self.root / f"{daemon}{'-' + h.hostname if daemon == 'slurmd' else ''}.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid.read_text()), signal.SIGTERM)
        if self.munged is not None and self.munged.poll() is None:
            self.munged.terminate()
            try:
                self.munged.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.munged.kill()
                self.munged.wait()
