"""Owed ACKs (native core): the end of an app's write, or bytes the consumer took, make an ACK owed at once,
but it is not written inside the packet's input. ``Stack.flush`` sends it with an answer written meanwhile
(no bare ACK at all) and says when one is still owed; ``Stack.flush_acks`` then sends it bare. Output goes
to a socketpair standing in for the TUN fd, so "nothing was sent yet" can be checked."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack import Stack, StackConfig, TcpConnectRequest
from tests.unit.tcp_peer import TcpPeer

PAIRS = [("198.18.0.2", "198.19.0.2"), ("fd58:3278:7373:1::2", "fd58::9")]


@pytest.fixture
def wired():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    stack = Stack(StackConfig(mtu=16000), clock="manual")
    stack.set_output_fd(ours.fileno())
    yield stack, theirs
    stack.close()
    ours.close()
    theirs.close()


def sent(wire: socket.socket) -> list[TCP]:
    out = []
    while True:
        try:
            raw = wire.recv(70000)
        except BlockingIOError:
            return out
        out.append((IPv6(raw) if raw[0] >> 4 == 6 else IP(raw))[TCP])


def connect(stack: Stack, wire: socket.socket, src: str, dst: str) -> tuple[TcpPeer, object]:
    peer = TcpPeer(stack, src, dst)
    peer.syn()
    (request,) = stack.events()
    assert isinstance(request, TcpConnectRequest)
    request.flow.accept()
    for raw in _raw(wire):
        peer.handle(raw)
    assert peer.got_synack
    peer.auto_ack = False
    return peer, request.flow


def _raw(wire: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(wire.recv(70000))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("src,dst", PAIRS)
def test_an_answer_in_the_same_turn_carries_the_owed_ack(wired, src, dst):
    stack, wire = wired
    peer, flow = connect(stack, wire, src, dst)
    peer.send(b"request", push=True)
    assert sent(wire) == [], "no bare ACK inside the input call"
    stack.events()
    data = flow.read()
    flow.ack(len(data))
    flow.write(b"answer")
    assert stack.flush() is False, "the answer carried the ACK: none is owed any more"
    (segment,) = sent(wire)
    assert bytes(segment.payload) == b"answer" and segment.ack == peer.seq
    stack.flush_acks()
    assert sent(wire) == [], "no bare ACK after all"


@pytest.mark.parametrize("src,dst", PAIRS)
def test_without_an_answer_the_ack_goes_bare_at_flush_acks(wired, src, dst):
    stack, wire = wired
    peer, flow = connect(stack, wire, src, dst)
    peer.send(b"first half of a write", push=True)
    stack.events()
    flow.ack(len(flow.read()))
    assert stack.flush() is True, "an ACK is still owed"
    assert sent(wire) == []
    stack.flush_acks()
    (ack,) = sent(wire)
    assert ack.ack == peer.seq and not bytes(ack.payload)
    stack.flush_acks()
    assert stack.flush() is False
    assert sent(wire) == [], "one ACK, never a duplicate"


def test_an_unread_write_end_is_still_acknowledged(wired):
    """The consumer does not read (paused): the app with Nagle on still gets its ACK at flush_acks."""
    stack, wire = wired
    peer, _flow = connect(stack, wire, *PAIRS[0])
    peer.send(b"HEAD", push=True)
    assert stack.flush() is True
    stack.flush_acks()
    assert [seg.ack for seg in sent(wire)] == [peer.seq]


def test_data_without_push_owes_nothing_until_the_consumer_takes_it(wired):
    stack, wire = wired
    peer, flow = connect(stack, wire, *PAIRS[0])
    peer.send(b"more to come", push=False)
    assert stack.flush() is False
    stack.events()
    flow.ack(len(flow.read()))
    assert stack.flush() is True
    stack.flush_acks()
    assert [seg.ack for seg in sent(wire)] == [peer.seq]


def test_a_flow_released_while_an_ack_is_owed_is_skipped(wired):
    stack, wire = wired
    peer, flow = connect(stack, wire, *PAIRS[0])
    other, _ = connect(stack, wire, "198.18.0.3", "198.19.0.2")
    peer.send(b"x", push=True)
    other.send(b"y", push=True)
    flow.abort()  # (lwIP sends the owed ACK before the RST as it removes the pcb)
    assert "R" in str(sent(wire)[-1].flags)
    stack.flush_acks()
    assert [(seg.dport, seg.ack) for seg in sent(wire)] == [(other.sport, other.seq)]
