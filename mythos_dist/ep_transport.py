"""The expert-parallel all-to-all between ranks of one host, over Unix sockets instead of gloo.

Why: on CPU, a gloo all_to_all_single costs ≈ 0.4-0.9 ms even for 64 bytes (the call hands the work
to gloo's worker thread, which hands it to its TCP loop, and back), and an expert-parallel forward
makes three of them per loop (counts, rows out, rows back): a fifth of a 2-rank training step here
went to that latency (docs/benchmarks.md). A connected Unix socket per pair of ranks, driven from
the calling thread, moves the same bytes in ≈ 0.1 ms.

`all_to_all_for(group, transport, timeout_s)` picks the transport of an expert-parallel group
(parallel.ep_transport): "process_group" always uses the group itself; "auto" uses local sockets
when the group runs on gloo and every one of its ranks is on this host (the same hostname, kernel
boot and network namespace), else the group. Same bytes, same order: results are bit-identical.

Failure is never a hang: a peer that exits closes its socket and the waiting ranks raise at once,
naming it; a peer that stops answering fails them after `timeout_s` (the collective timeout); a
message of a size other than the receiver expects is an error, not garbled rows.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
import uuid

import torch
import torch.distributed as dist

from mythos_dist.model.dispatch import AllToAll, ProcessGroupAllToAll

TRANSPORTS = ("auto", "process_group")  # parallel.ep_transport
_HEADER = struct.Struct("<q")  # each message starts with its payload's byte count
_BUFFER_BYTES = 4 << 20


def _host_identity() -> tuple[str, str, int]:
    """Ranks that share all three can reach each other's abstract Unix sockets (Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:  # not Linux: no abstract sockets, so never "one host"
        return socket.gethostname(), uuid.uuid4().hex, 0
    return socket.gethostname(), boot, netns


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes (any dtype, bf16 included), no copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class LocalSocketAllToAll:
    """all_to_all_single for the ranks of `group`, all on this host: one connected Unix socket per
    pair, driven without threads (nonblocking sends and receives interleaved by poll, so two
    ranks sending each other more than a socket buffer never deadlock). Create it collectively
    (`connect`), on every rank of the group in the same order."""

    def __init__(self, socks: dict[int, socket.socket], rank: int, size: int, timeout_s: float):
        self.socks, self.rank, self.size, self.timeout_s = socks, rank, size, timeout_s
        self.broken: str | None = None  # after a failure, every later call fails the same way

    @classmethod
    def connect(cls, group: dist.ProcessGroup | None, timeout_s: float) -> LocalSocketAllToAll | None:
        """Collective over `group`: sockets to every peer, or None on every rank when the group is
        not all on this host (then nothing was connected)."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | None = f"\0mythos-ep-{uuid.uuid4().hex}-{rank}"  # abstract: nothing on disk
        error = ""
        try:
            listener.bind(address)
            listener.listen(size)
        except OSError as e:  # still join the gather below, so no peer waits in it for this rank
            error, address = f"{type(e).__name__}: {e}", None
        peers: list = [None] * size
        dist.all_gather_object(peers, (_host_identity(), address), group=group)
        if any(identity != peers[rank][0] for identity, _ in peers):
            listener.close()  # every rank sees the same mismatch: all return None
            return None
        socks: dict[int, socket.socket] = {}
        opened: list[socket.socket] = []  # all closed if any rank fails
        try:
            if any(a is None for _, a in peers):
                raise OSError(error or "a peer could not open its socket")
            for peer in range(rank):  # connect to lower ranks, accept the higher ones
                opened.append(s := socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                s.settimeout(timeout_s)
                s.connect(peers[peer][1])
                s.sendall(struct.pack("<i", rank))
                socks[peer] = s
            listener.settimeout(timeout_s)
            for _ in range(rank + 1, size):
                s, _ = listener.accept()
                opened.append(s)
                s.settimeout(timeout_s)
                (peer,) = struct.unpack("<i", _recv_exactly(s, 4))
                socks[peer] = s
        except OSError as e:
            error = error or f"{type(e).__name__}: {e}"
        finally:
            listener.close()
        ok = torch.tensor([0 if error else 1])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        if not ok.item():
            for s in opened:
                s.close()
            raise RuntimeError(
                f"expert-parallel local sockets: rank {rank} of the EP group could not connect to "
                f"its peers on this host ({error or 'a peer failed'}); set parallel.ep_transport="
                "process_group to use the process group instead"
            )
        for s in socks.values():
            s.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, _BUFFER_BYTES)
        return cls(socks, rank, size, timeout_s)

    def __call__(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> None:
        """dist.all_to_all_single(out, inp, out_splits, in_splits) (splits in rows of dim 0; None:
        equal parts)."""
        if self.broken:
            raise RuntimeError(self.broken)
        if not out.is_contiguous():
            raise ValueError("local all-to-all: the output tensor must be contiguous")
        inp = inp.contiguous()
        send_at, recv_at = self._offsets(inp, in_splits, "input"), self._offsets(out, out_splits, "output")
        src, dst = _bytes_of(inp), _bytes_of(out)
        me = self.rank
        dst[recv_at[me] : recv_at[me + 1]] = src[send_at[me] : send_at[me + 1]]
        try:
            self._exchange(src, dst, send_at, recv_at)
        except RuntimeError as e:
            self.broken = str(e)
            raise

    def _offsets(self, t: torch.Tensor, splits: list[int] | None, what: str) -> list[int]:
        rows = t.shape[0]
        if splits is None:
            if rows % self.size:
                raise ValueError(f"local all-to-all: {what} of {rows} rows does not split into {self.size}")
            splits = [rows // self.size] * self.size
        if len(splits) != self.size or sum(splits) != rows:
            raise ValueError(
                f"local all-to-all: {what} splits {splits} do not cover {rows} rows in {self.size}"
            )
        row_bytes = t[0].numel() * t.element_size() if rows else 0
        at = [0]
        for n in splits:
            at.append(at[-1] + n * row_bytes)
        return at

    def _exchange(self, src: memoryview, dst: memoryview, send_at: list[int], recv_at: list[int]) -> None:
        # Per peer: what is left to send (header, then payload) and where the next bytes land.
        to_send = {
            p: [memoryview(_HEADER.pack(send_at[p + 1] - send_at[p])), src[send_at[p] : send_at[p + 1]]]
            for p in self.socks
        }
        headers = {p: bytearray(_HEADER.size) for p in self.socks}
        got = {p: 0 for p in self.socks}  # bytes received from p, header included
        deadline = time.monotonic() + self.timeout_s
        while True:
            for p in [p for p in to_send if to_send[p]]:
                self._send_some(p, to_send[p])
            for p in [p for p in got if got[p] is not None]:
                got[p] = self._recv_some(p, got[p], headers[p], dst[recv_at[p] : recv_at[p + 1]])
            events = {self.socks[p].fileno(): select.POLLIN for p in got if got[p] is not None}
            for p in [p for p in to_send if to_send[p]]:
                fd = self.socks[p].fileno()
                events[fd] = events.get(fd, 0) | select.POLLOUT
            if not events:
                return
            poller = select.poll()  # not select(): that fails for descriptors past 1,023
            for fd, mask in events.items():
                poller.register(fd, mask)
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                waiting = ", ".join(str(p) for p in sorted(got) if got[p] is not None) or "-"
                raise RuntimeError(
                    f"local all-to-all: EP rank {self.rank} waited {self.timeout_s:.0f} s "
                    f"(parallel.timeout_s) for EP rank(s) {waiting}: is a rank stuck or gone?"
                )

    def _send_some(self, peer: int, parts: list[memoryview]) -> None:
        try:
            while parts:
                sent = self.socks[peer].send(parts[0])
                parts[0] = parts[0][sent:]
                if len(parts[0]):
                    return  # the socket buffer is full
                parts.pop(0)
        except BlockingIOError:
            return
        except OSError as e:
            raise RuntimeError(
                f"local all-to-all: sending to EP rank {peer} failed ({e}): did it exit?"
            ) from e

    def _recv_some(self, peer: int, got: int, header: bytearray, payload: memoryview) -> int | None:
        """Reads what has arrived from `peer`; -> bytes received so far, None once complete."""
        h = _HEADER.size
        try:
            while True:
                if got < h:
                    n = self.socks[peer].recv_into(memoryview(header)[got:], h - got)
                else:
                    if got == h:
                        (size,) = _HEADER.unpack(header)
                        if size != len(payload):
                            raise RuntimeError(
                                f"local all-to-all: EP rank {peer} sends {size} bytes, EP rank "
                                f"{self.rank} expects {len(payload)}: the ranks disagree on the splits"
                            )
                    if got - h == len(payload):
                        return None
                    n = self.socks[peer].recv_into(payload[got - h :], len(payload) - (got - h))
                if n == 0:
                    raise RuntimeError(
                        f"local all-to-all: EP rank {peer} closed its connection mid-exchange "
                        f"(it exited or failed); EP rank {self.rank} stops too"
                    )
                got += n
        except BlockingIOError:
            return got
        except OSError as e:
            raise RuntimeError(
                f"local all-to-all: receiving from EP rank {peer} failed ({e}): did it exit?"
            ) from e


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection while connecting")
        buf += chunk
    return buf


# One transport per process group (every MoE layer shares it).
_CONNECTED: dict[dist.ProcessGroup | None, AllToAll] = {}


def _drop_sockets_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep the parent's sockets open: while any copy
    is open, a rank that dies does not close its connections, and its peers would wait for the
    timeout instead of failing at once."""
    for exchange in _CONNECTED.values():
        if isinstance(exchange, LocalSocketAllToAll):
            for s in exchange.socks.values():
                s.close()
            exchange.broken = "local all-to-all: these sockets belong to the parent process (forked)"
    _CONNECTED.clear()


os.register_at_fork(after_in_child=_drop_sockets_in_child)


def all_to_all_for(group: dist.ProcessGroup | None, transport: str, timeout_s: float) -> AllToAll:
    """The all-to-all of an expert-parallel group (collective the first time for each group)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"parallel.ep_transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "process_group" or dist.get_backend(group) != "gloo":
        return ProcessGroupAllToAll(group)
    if group not in _CONNECTED:
        _CONNECTED[group] = LocalSocketAllToAll.connect(group, timeout_s) or ProcessGroupAllToAll(group)
    return _CONNECTED[group]


def describe(model: torch.nn.Module) -> str:
    """How `model`'s expert-parallel all-to-alls travel, for the run's log."""
    for m in model.modules():
        exchange = getattr(getattr(m, "dispatcher", None), "all_to_all", None)
        if isinstance(exchange, LocalSocketAllToAll):
            return f"local Unix sockets ({exchange.size} ranks on this host)"
        if isinstance(exchange, ProcessGroupAllToAll):
            return f"the process group ({dist.get_backend(exchange.group)})"
    return "none (no expert-parallel layer)"
