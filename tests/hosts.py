"""Test hosts: nodes made of Linux namespaces on this machine, for real multi-node tests (root only).

Each host is a network namespace with two interfaces, each on its own bridge in a private "switch"
namespace (nothing is added to the machine's own namespace, there is no default route and no
forwarding, so traffic can only go between these hosts):
  mgmt0  10.213.7.(10+i)/26   the address its hostname resolves to (/etc/hosts of every host)
  fast0  10.213.7.(74+i)/26   a second interface, e.g. for the rendezvous endpoint and collectives
plus its own hostname (UTS namespace), its own /dev/shm (a tmpfs in its own mount namespace) and
a node-local directory (`Host.local`, also its TMPDIR: the same path on every host, each host's own
directory mounted there, like a cluster's node-local scratch). The file system is otherwise shared,
as on a cluster with a shared home. One holder process per host keeps its namespaces alive; `Host.cmd`
wraps a command to run inside them.

    with Hosts(tmp, 2) as hosts:
        p = hosts[0].popen([...], log)
        hosts.cut(1)        # node1's fast0 cable pulled at the switch: packets dropped, no reset

`close()` (also on an exception in the `with` body) kills every process in the hosts' network
namespaces and deletes the namespaces. Names carry the test process id, so parallel runs do not
collide; namespaces of dead test processes are removed on the next start.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.multiproc import REPO

PREFIX = "mythos-test"
NETS = {"mgmt0": 10, "fast0": 74}  # interface -> last octet of host 0 (two /26 in 10.213.7.0/24)
SUBNET = "10.213.7"
_counter = iter(range(1 << 30))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _no_ipv6(ns: str) -> None:
    """No IPv6 in the namespace: no link-local addresses, router solicitations or DAD traffic."""
    conf = "/proc/sys/net/ipv6/conf"
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                    f"echo 1 > {conf}/all/disable_ipv6; echo 1 > {conf}/default/disable_ipv6"],
                   check=True, capture_output=True, timeout=30)  # fmt: skip


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in r.stdout.split()]


def available() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "namespace hosts need root (ip netns, unshare)"
    for tool in ("ip", "unshare", "nsenter"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"{tool} not installed (apt-get install iproute2 util-linux)"
    return None


def remove_stale() -> None:
    """Delete the namespaces left by test processes that died without cleaning up."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in r.stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not ns.startswith(PREFIX + "-"):
            continue
        owner = int(ns.split("-")[2])
        if not Path(f"/proc/{owner}").exists():
            for pid in _netns_pids(ns):
                _kill(pid)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Host:
    index: int
    hostname: str
    netns: str
    local: Path  # node-local directory (TMPDIR, caches): the same path on each host, its own content
    backing: Path  # the directory mounted there
    holder: subprocess.Popen | None = None

    def addr(self, dev: str = "fast0") -> str:
        return f"{SUBNET}.{NETS[dev] + self.index}"

    def cmd(self, argv: Sequence[str], cwd: Path = REPO) -> list[str]:
        """`argv` run in this host's network, UTS and mount namespaces, in `cwd`."""
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m", f"--wd={cwd}", "--", *argv]

    def popen(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` on this host (own session, stdout+stderr to `log`, TMPDIR = `local`)."""
        env = dict(os.environ if env is None else env, TMPDIR=str(self.local))
        with open(log, "w") as f:  # the child keeps its own descriptor
            return subprocess.Popen(
                self.cmd(argv), env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def run(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout, **kw)


class UpDown(abc.ABC):
    """A `with` block around up() / close(); close() also runs when up() fails halfway."""

    @abc.abstractmethod
    def up(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hosts(UpDown):
    """`n` namespace hosts (see the module docstring); a context manager that removes them."""

    def __init__(self, tmp: Path, n: int = 2):
        self.tmp = Path(tmp)
        tag = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.switch = f"{tag}-sw"
        self.hosts = [
            Host(i, f"node{i}", f"{tag}-n{i}", self.tmp / "local", self.tmp / f"node{i}") for i in range(n)
        ]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def up(self) -> None:
        remove_stale()
        sw = self.switch
        _ip("netns", "add", sw)
        _no_ipv6(sw)
        for dev in NETS:
            _ip("-n", sw, "link", "add", f"br-{dev}", "type", "bridge")
            _ip("-n", sw, "link", "set", f"br-{dev}", "up")
        etc = self.tmp / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        names = "".join(f"{h.addr('mgmt0')} {h.hostname}\n" for h in self.hosts)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
        (etc / "resolv.conf").write_text("")  # no DNS server: names resolve from /etc/hosts only
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _no_ipv6(h.netns)
            _ip("-n", h.netns, "link", "set", "lo", "up")
            for dev in NETS:
                port = f"h{h.index}-{dev[:4]}"  # the switch's end of the cable
                _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", h.netns)
                _ip("-n", sw, "link", "set", port, "master", f"br-{dev}", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.addr(dev)}/26", "dev", dev)
                _ip("-n", h.netns, "link", "set", dev, "up")
            h.local.mkdir(parents=True, exist_ok=True)
            h.backing.mkdir(parents=True, exist_ok=True)
            script = (
                f"hostname {h.hostname} && mount -t tmpfs -o size=256m,mode=1777 tmpfs /dev/shm && "
                f"mount --bind {h.backing} {h.local} && mount --bind {etc / 'hosts'} /etc/hosts && mount --bind {etc / 'resolv.conf'} /etc/resolv.conf && "
                "echo ready && exec sleep infinity"
            )
            h.holder = subprocess.Popen(
                # nsenter, not `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup (slurmd)
                ["nsenter", f"--net=/run/netns/{h.netns}", "unshare", "--uts", "--mount", "--propagation",
                 "private", "sh", "-c", script],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
            line = h.holder.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"test host {h.hostname} did not start: {line} {h.holder.stdout.read()}")
        self.wait_reachable()

    def reachable(self, src: int, dst: int, dev: str = "fast0") -> bool:
        """Whether host `dst` answers host `src` (a TCP connect to a closed port: refused = reached)."""
        probe = (
            "import socket, sys\n"
            "try: socket.create_connection((sys.argv[1], 9), timeout=1)\n"
            "except ConnectionRefusedError: sys.exit(0)\n"
            "except OSError: sys.exit(1)"
        )
        return self.hosts[src].run([sys.executable, "-c", probe, self.hosts[dst].addr(dev)]).returncode == 0

    def wait_reachable(self, timeout: float = 20) -> None:
        """Until host 0 reaches every host on both interfaces (bridges take a moment)."""
        deadline = time.monotonic() + timeout
        for h in self.hosts[1:]:
            for dev in NETS:
                while not self.reachable(0, h.index, dev):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{h.hostname} {h.addr(dev)} not reachable from node0")
                    time.sleep(0.2)

    def start_ssh(self) -> None:
        """Passwordless root ssh between the hosts by hostname: a dropbear server on each host's
        mgmt0 port 22 and, on every host, /root/.ssh replaced (in its mount namespace only) by a
        directory with a fresh key, authorized_keys and a config that skips host-key checks."""
        ssh = self.tmp / "ssh"
        ssh.mkdir(mode=0o700)
        key = ssh / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
        )
        (ssh / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
        os.chmod(ssh / "authorized_keys", 0o600)
        (ssh / "config").write_text(
            f"Host *\n  IdentityFile {key}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n  BatchMode yes\n"
        )
        host_key = self.tmp / "ssh_host_key"
        subprocess.run(
            ["dropbearkey", "-t", "ed25519", "-f", str(host_key)], check=True, capture_output=True, timeout=30
        )
        # The mount point must exist (a fresh machine may have no /root/.ssh yet); ssh would make it so.
        Path("/root/.ssh").mkdir(mode=0o700, exist_ok=True)
        for h in self.hosts:
            r = h.run(["mount", "--bind", str(ssh), "/root/.ssh"])
            assert r.returncode == 0, r.stderr
            # -F foreground, -E log to stderr, -s no passwords
            cmd = ["dropbear", "-F", "-E", "-s", "-r", str(host_key), "-p", f"{h.addr('mgmt0')}:22",
                   "-P", str(self.tmp / f"dropbear-{h.hostname}.pid")]  # fmt: skip
            h.popen(cmd, self.tmp / f"dropbear-{h.hostname}.log")
        deadline = time.monotonic() + 20
        for h in self.hosts:
            while self.hosts[0].run(["ssh", h.hostname, "true"]).returncode:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no ssh to {h.hostname}: {(self.tmp / f'dropbear-{h.hostname}.log').read_text()}"
                    )
                time.sleep(0.2)

    def cut(self, i: int, dev: str = "fast0") -> None:
        """Pull host i's cable at the switch: its packets are dropped silently (no reset, no error)."""
        _ip("-n", self.switch, "link", "set", f"h{i}-{dev[:4]}", "down")

    def restore(self, i: int, dev: str = "fast0") -> None:
        _ip("-n", self.switch, "link", "set", f"h{i}-{dev[:4]}", "up")

    def close(self) -> None:
        """Kill everything running on the hosts, then delete their namespaces. Idempotent."""
        for ns in [h.netns for h in self.hosts] + [self.switch]:
            for _ in range(3):  # processes may fork while being killed
                pids = _netns_pids(ns)
                if not pids:
                    break
                for pid in pids:
                    _kill(pid)
                time.sleep(0.2)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for h in self.hosts:
            if h.holder is not None:
                _kill(h.holder.pid)
                h.holder.wait(timeout=10)
                h.holder.stdout.close()
                h.holder = None
