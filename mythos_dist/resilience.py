"""Bounded failure and clean preemption for the training loop, on every backend (gloo and NCCL).

`PeerWatchdog`: every rank sends heartbeats through the rendezvous store; when a peer's heartbeats
stop for parallel.timeout_s (or this rank loses the store), it prints one line naming the silent rank
and the step, phase and collective it is blocked in, and ends its process with EXIT_STUCK. An error
raised inside a collective (the backend's timeout, a reset) becomes `PeerLost` with the same line. The backends' own
timeouts do not cover a silent peer: when a link drops packets without a reset, gloo ranks were
seen blocked for well over 10× their timeout. Threads, because the blocked main thread cannot act
(the collectives release the GIL).

`Preemption`: SIGTERM (SLURM at the time limit, `scancel`, `--signal=TERM@T`, torchrun's agent when
it stops) only sets a flag; at the next step boundary every rank learns whether any rank got it
(one all-reduce), so all of them save the same checkpoint and leave together.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from mythos_dist.comm import all_reduce_host

EXIT_STUCK = 75  # EX_TEMPFAIL: a peer or the network failed; relaunching resumes from `latest`
# Where collectives run, and the name to report for one (None: its frame's function name). The
# expert-parallel exchange over local sockets is all_to_all_single by another road.
_COLLECTIVE_FILES = {
    "torch/distributed/distributed_c10d.py": None,
    "deepspeed/comm/": None,
    "mythos_dist/ep_transport.py": "all_to_all_single",
}


def _collective_file(filename: str) -> str | None:
    return next((c for c in _COLLECTIVE_FILES if c in filename), None)


class PeerLost(RuntimeError):
    """A collective failed: a peer rank died, stopped or became unreachable."""


def blocked_in(frame: FrameType | None, error: BaseException | None = None) -> str:
    """'in collective all_reduce (called from mythos_dist/comm.py:17 all_reduce_host)': the innermost
    collective on `frame`'s stack and the innermost frame of ours; just the latter when no collective."""
    if error is not None:  # the frames from the handler down to where the error was raised
        stack = traceback.extract_tb(error.__traceback__)
    else:
        stack = traceback.extract_stack(frame) if frame is not None else []
    collectives = [f for f in stack if _collective_file(f.filename)]
    ours = [
        f
        for f in stack
        if "/mythos_dist/" in f.filename
        and not f.filename.endswith("/comm.py")
        and not _collective_file(f.filename)
    ]
    where = ""
    if ours:
        f = ours[-1]
        where = f"{f.filename[f.filename.rindex('/mythos_dist/') + 1 :]}:{f.lineno} {f.name}"
    if not collectives:
        return f"in {where or 'unknown code'}"
    inner = collectives[-1]
    name = _COLLECTIVE_FILES[_collective_file(inner.filename)] or inner.name
    return f"in collective {name} (called from {where or 'outside mythos_dist'})"


class PeerWatchdog:
    """Ends this process within about timeout_s of a peer rank going silent (see the module docstring).

    Every rank bumps a counter of its own in the process group's store (the rendezvous store)
    every `period` seconds and reads everyone's; a peer whose counter has not moved for timeout_s,
    or no successful round for timeout_s (this rank cannot reach the store; it then ends its torchrun
    agent too, see `_end_torchrun_agent`), ends the process with one line: which rank went silent, and
    the step, phase (`mark`) and collective this rank is blocked in.
    Compute of any length is fine: the heartbeats come from a thread. Cost per rank and period: one
    small store write and one read of world_size counters.
    """

    def __init__(self, timeout_s: float, rank: int, hosts: list[str], exit_code: int = EXIT_STUCK):
        self.timeout_s, self.rank, self.hosts, self.exit_code = timeout_s, rank, hosts, exit_code
        self.period = min(5.0, max(0.5, timeout_s / 10))
        self._phase = (0, "start")  # (step, phase): replaced, never mutated
        self._main = threading.main_thread().ident
        self._stopped = threading.Event()
        now = time.monotonic()
        self._last_round = now  # last heartbeat round that reached the store
        self._peers: dict[int, tuple[int, float]] = {r: (-1, now) for r in range(len(hosts)) if r != rank}
        self._threads = []
        if self._peers:
            from torch.distributed.distributed_c10d import _get_default_store

            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self._keys = [f"mythos_heartbeat/{restart}/{r}" for r in range(len(hosts))]
            self._store = _get_default_store()
            # the store calls may block (up to the store's timeout) when the network is gone: the
            # beats run apart from the check, which only reads times and never blocks
            self._threads = [threading.Thread(target=f, name=f"mythos-{f.__name__[1:]}", daemon=True)
                             for f in (self._beat, self._check)]  # fmt: skip
            for t in self._threads:
                t.start()

    def mark(self, step: int, phase: str) -> None:
        """Step `step` (1-based) is now in `phase` (named in the failure line)."""
        self._phase = (step, phase)

    def collective_failed(self, error: BaseException) -> PeerLost | None:
        """For an error raised inside a collective (the backend's own timeout, a connection reset by a
        dead peer): a PeerLost whose message is one line with the step, phase and collective. None for
        any other error. When this rank cannot reach the store either (a cut link, not a dead peer),
        it prints that line and ends the process and its torchrun agent instead, as the check does."""
        where = blocked_in(None, error)
        if not where.startswith("in collective"):
            return None
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        unreached_s = time.monotonic() - self._last_round
        if self._peers and unreached_s > max(3 * self.period, 5.0):  # the store is gone as well
            self._give_up(f"failed {where}: {cause}; this rank has not reached the rendezvous store "
                          f"for {unreached_s:.0f} s", store_lost=True)  # fmt: skip
        self.stop()  # no second line from the heartbeat check while this one unwinds
        step, phase = self._phase
        return PeerLost(
            f"rank {self.rank} on {socket.gethostname()}: step {step}, {phase}, failed {where}: {cause} "
            f"(parallel.timeout_s={self.timeout_s:g}): a peer is unreachable, stopped or dead. Relaunch to "
            "resume from the last complete checkpoint"
        )

    def stop(self) -> None:
        self._stopped.set()
        for t in self._threads:
            t.join(timeout=self.period + 1)  # a beat blocked in the store is a daemon: left behind

    def _beat(self) -> None:
        created = False
        while not self._stopped.is_set():
            try:
                self._store.add(self._keys[self.rank], 1)
                if not created:  # add(0) creates the peers' keys: multi_get would wait for them
                    counts = [int(self._store.add(self._keys[r], 0)) for r in self._peers]
                    created = True
                else:
                    counts = [int(v) for v in self._store.multi_get([self._keys[r] for r in self._peers])]
                now = time.monotonic()
                peers = dict(self._peers)
                for r, count in zip(self._peers, counts):
                    if count != peers[r][0]:
                        peers[r] = (count, now)
                self._peers, self._last_round = peers, now
            except Exception:  # the store timed out or went away: the check decides when to give up
                pass
            self._stopped.wait(self.period)

    def _check(self) -> None:
        while not self._stopped.wait(min(1.0, self.period)):
            now = time.monotonic()
            why = None
            if now - self._last_round > self.timeout_s:
                why = f"this rank has not reached the rendezvous store for {now - self._last_round:.0f} s"
            else:
                silent = [(r, now - t) for r, (_, t) in self._peers.items() if now - t > self.timeout_s]
                if silent:
                    r, quiet_s = max(silent, key=lambda x: x[1])
                    others = f" (and {len(silent) - 1} more)" if len(silent) > 1 else ""
                    why = f"rank {r} on {self.hosts[r]}{others} has sent no heartbeat for {quiet_s:.0f} s"
            if why is not None:
                where = blocked_in(sys._current_frames().get(self._main))
                self._give_up(f"blocked {where}: {why}", store_lost=why.startswith("this rank has not"))

    def _give_up(self, what: str, store_lost: bool) -> None:
        """Print the one line and end the process (and, without the store, our torchrun agent)."""
        step, phase = self._phase
        print(
            f"mythos: rank {self.rank} on {socket.gethostname()}: step {step}, {phase}, {what} "
            f"(parallel.timeout_s={self.timeout_s:g}): a peer is unreachable, stopped or dead. "
            f"Exiting with status {self.exit_code}; relaunch to resume from the last complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        if store_lost:
            _end_torchrun_agent()
        os._exit(self.exit_code)  # the main thread may be blocked in a collective: no cleanup can run


def _end_torchrun_agent() -> None:
    """SIGKILL our torchrun agent, if any: it needs the same unreachable store and would block on it
    for minutes (60 s per store call, several calls) before noticing that its ranks have ended."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    agent = os.getppid()
    try:
        cmdline = Path(f"/proc/{agent}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return
    if "torch.distributed.run" in cmdline or "torchrun" in cmdline:
        print(
            f"mythos: ending torchrun agent {agent}, which waits on the same store",
            file=sys.stderr,
            flush=True,
        )
        os.kill(agent, signal.SIGKILL)


class Preemption:
    """SIGTERM → checkpoint at the next step boundary on every rank (see the module docstring).

    Installs its handler on creation (main thread only) and restores the previous one on `close`.
    """

    SIGNALS = (signal.SIGTERM,)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """Collective: whether any rank has received the signal (the same answer on every rank)."""
        flag = torch.tensor([float(self.received is not None)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = all_reduce_host(flag, dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
