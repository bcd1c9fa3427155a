"""A collective that fails because a peer is gone becomes one PeerLost line (resilience), also when the
collective is the expert-parallel all-to-all over local sockets, which torch does not know of."""

from __future__ import annotations

import socket

import pytest
import torch

from mythos_dist.ep_transport import LocalSocketAllToAll
from mythos_dist.resilience import PeerLost, PeerWatchdog


def test_local_socket_exchange_with_a_closed_peer_becomes_peer_lost() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.setblocking(False)
    theirs.close()  # EP rank 1 is gone
    exchange = LocalSocketAllToAll({1: mine}, rank=0, size=2, timeout_s=5.0)
    with pytest.raises(RuntimeError, match="EP rank 1") as raised:
        exchange(torch.empty(4, 3), torch.ones(4, 3))
    watchdog = PeerWatchdog(timeout_s=5.0, rank=0, hosts=[socket.gethostname()])  # one rank: no threads
    watchdog.mark(7, "forward")
    lost = watchdog.collective_failed(raised.value)
    assert isinstance(lost, PeerLost)
    assert str(lost).startswith(
        f"rank 0 on {socket.gethostname()}: step 7, forward, failed in collective all_to_all_single"
    )
    assert "a peer is unreachable, stopped or dead" in str(lost)
    with pytest.raises(RuntimeError, match="EP rank 1"):  # and it stays broken: no half-made exchange later
        exchange(torch.empty(4, 3), torch.ones(4, 3))
    mine.close()


def test_an_error_outside_any_collective_is_not_peer_lost() -> None:
    watchdog = PeerWatchdog(timeout_s=5.0, rank=0, hosts=[socket.gethostname()])
    try:
        raise RuntimeError("a shape mismatch")
    except RuntimeError as e:
        assert watchdog.collective_failed(e) is None
