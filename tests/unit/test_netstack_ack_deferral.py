"""Owed ACKs (native core): the end of an app's write, or bytes the consumer took, make an ACK owed at once,
but it is not written inside the packet's input. ``Stack.flush`` sends it with an answer written meanwhile
(no bare ACK at all) and says when one is still owed; ``Stack.flush_acks`` then sends it bare. A flow's
first owed ACK is held (``ACKS_HELD``): ``flush_acks(held=False)`` keeps it for the answer. Output goes
to a socketpair standing in for the TUN fd, so "nothing was sent yet" can be checked."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack import LocalProtocolError, Stack, StackConfig, TcpConnectRequest
from netstack.stack import ACKS_HELD, ACKS_NOW
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
    assert stack.flush() == 0, "the answer carried the ACK: none is owed any more"
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
    assert stack.flush() == ACKS_HELD, "an ACK is still owed"
    assert sent(wire) == []
    stack.flush_acks()
    (ack,) = sent(wire)
    assert ack.ack == peer.seq and not bytes(ack.payload)
    stack.flush_acks()
    assert stack.flush() == 0
    assert sent(wire) == [], "one ACK, never a duplicate"


def test_an_unread_write_end_is_still_acknowledged(wired):
    """The consumer does not read (paused): the app with Nagle on still gets its ACK at flush_acks."""
    stack, wire = wired
    peer, _flow = connect(stack, wire, *PAIRS[0])
    peer.send(b"HEAD", push=True)
    assert stack.flush() == ACKS_HELD
    stack.flush_acks()
    assert [seg.ack for seg in sent(wire)] == [peer.seq]


def test_data_without_push_owes_nothing_until_the_consumer_takes_it(wired):
    stack, wire = wired
    peer, flow = connect(stack, wire, *PAIRS[0])
    peer.send(b"more to come", push=False)
    assert stack.flush() == 0
    stack.events()
    flow.ack(len(flow.read()))
    assert stack.flush() == ACKS_HELD
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


@pytest.mark.parametrize("src,dst", PAIRS)
def test_a_flows_first_owed_ack_is_held_for_its_answer(wired, src, dst):
    stack, wire = wired
    peer, flow = connect(stack, wire, src, dst)
    peer.send(b"GET / HTTP/1.0\r\n\r\n", push=True)
    stack.events()
    flow.ack(len(flow.read()))
    assert stack.flush() == ACKS_HELD
    assert stack.flush_acks(held=False) is True, "still held"
    assert sent(wire) == [], "no bare ACK: the answer may still come"
    flow.write(b"HTTP/1.0 200 OK\r\n\r\n")
    assert stack.flush() == 0, "the answer carried the ACK"
    (segment,) = sent(wire)
    assert segment.ack == peer.seq and bytes(segment.payload).startswith(b"HTTP/1.0 200")
    assert stack.flush_acks() is False
    assert sent(wire) == []


def test_only_the_first_owed_ack_is_held(wired):
    """An app that keeps writing with Nagle on and gets no answer waits for a held ACK once, never again."""
    stack, wire = wired
    peer, _flow = connect(stack, wire, *PAIRS[0])
    peer.send(b"one", push=True)
    assert stack.flush() == ACKS_HELD
    stack.flush_acks()  # the hold ended without an answer
    assert [seg.ack for seg in sent(wire)] == [peer.seq]
    for chunk in (b"two", b"three"):
        peer.send(chunk, push=True)
        assert stack.flush() == ACKS_NOW
        assert stack.flush_acks(held=False) is False
        assert [seg.ack for seg in sent(wire)] == [peer.seq]


def test_held_and_prompt_acks_of_different_flows(wired):
    stack, wire = wired
    old, _ = connect(stack, wire, *PAIRS[0])
    old.send(b"first", push=True)
    stack.flush()
    stack.flush_acks()
    sent(wire)
    stack.events()
    new, _ = connect(stack, wire, "198.18.0.3", "198.19.0.2")
    old.send(b"second", push=True)
    new.send(b"request", push=True)
    assert stack.flush() == ACKS_NOW | ACKS_HELD
    assert stack.flush_acks(held=False) is True
    assert [(seg.dport, seg.ack) for seg in sent(wire)] == [(old.sport, old.seq)]
    assert stack.flush_acks() is False
    assert [(seg.dport, seg.ack) for seg in sent(wire)] == [(new.sport, new.seq)]


def test_ack_hold_is_bounded():
    for bad in (-0.001, 0.5):
        with pytest.raises(LocalProtocolError):
            Stack(StackConfig(ack_hold=bad))
