"""Fixtures shared by the unit tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from netstack import Stack, StackConfig
from tests.unit.tcp_peer import Wire


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A netstack on a manual clock; a test module sets `STACK_MTU` for another MTU than 16,000."""
    s = Stack(StackConfig(mtu=getattr(request.module, "STACK_MTU", 16000)), clock="manual")
    yield s
    s.close()


@pytest.fixture
def wired() -> Iterator[tuple[socket.socket, Wire]]:
    """A socketpair standing in for a TUN device: the netstack's end (non-blocking) and the app's `Wire`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    yield ours, Wire(theirs)
    ours.close()
    theirs.close()
