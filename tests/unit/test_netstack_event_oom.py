"""A flow's events survive an event queue that cannot grow (out of memory).

The glue queues events for Python in a growable array. Before, an event that found it full and could not
grow it was dropped: a lost TcpClosed left the flow's transport, channel and id behind for good, and the
app's connection hung. Now such an event waits on its flow and comes with a later ``events()`` call, in
order. ``ns_test_freeze_events`` makes the queue behave as full and unable to grow, as when realloc fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP

from netstack import (
    CloseReason,
    TcpClosed,
    TcpConnectRequest,
    TcpDataReceived,
    TcpEndOfStream,
    UdpDatagram,
)
from netstack._loader import load
from tests.unit.tcp_peer import TcpPeer, connect, deliver

_, lib = load()
APP, DEST = "198.18.0.2", "198.19.0.2"


@pytest.fixture
def frozen() -> Iterator[object]:
    """Call to freeze the event queue (it then finds no room); `thaw()` (or the test's end) lets it grow."""

    class Switch:
        def __call__(self) -> None:
            lib.ns_test_freeze_events(1)

        def thaw(self) -> None:
            lib.ns_test_freeze_events(0)

    switch = Switch()
    yield switch
    switch.thaw()


def test_a_reset_that_finds_no_room_still_reaches_python(stack, frozen):
    peer = TcpPeer(stack, APP, DEST, sport=41001)
    flow = connect(stack, peer)
    assert stack.events() == []
    frozen()
    peer.rst()
    assert stack.events() == []  # no room yet: the close waits on its flow
    assert stack.stats()["events_deferred"] == 1
    assert not flow.closed
    deadline = stack.timer_deadline()
    assert deadline is not None and deadline <= 0.010  # the caller is asked to look again soon
    frozen.thaw()
    (closed,) = stack.events()
    assert isinstance(closed, TcpClosed) and closed.flow is flow and closed.reason is CloseReason.RESET
    assert flow.closed and stack.stats()["flows_live"] == 0
    assert stack.events() == []  # once only


def test_data_eof_and_a_graceful_close_keep_their_order(stack, frozen):
    peer = TcpPeer(stack, APP, DEST, sport=41002)
    flow = connect(stack, peer)
    frozen()
    peer.send(b"request")
    assert stack.events() == []
    frozen.thaw()
    # The queue has room again, but the flow's READABLE still waits: its EOF must not overtake it.
    peer.fin()
    assert [type(e) for e in stack.events()] == [TcpDataReceived, TcpEndOfStream]
    assert flow.read() == b"request"
    frozen()
    flow.shutdown()
    deliver(stack, [peer])  # the app ACKs our FIN: lwIP ends the connection
    assert peer.got_fin and not peer.got_rst
    assert stack.events() == []
    frozen.thaw()
    (closed,) = stack.events()
    assert isinstance(closed, TcpClosed) and closed.reason is CloseReason.NORMAL


def test_a_close_after_the_last_read_finds_no_room(stack, frozen):
    peer = TcpPeer(stack, APP, DEST, sport=41003)
    flow = connect(stack, peer)
    peer.send(b"unread")
    peer.fin()
    flow.shutdown()
    deliver(stack, [peer])
    assert [type(e) for e in stack.events()] == [TcpDataReceived, TcpEndOfStream]
    frozen()
    assert flow.read() == b"unread"  # the last byte read: now the (deferred) close, with no room
    assert stack.events() == []
    frozen.thaw()
    assert [type(e) for e in stack.events()] == [TcpClosed]


def test_a_connect_that_finds_no_room_comes_later_with_its_addresses(stack, frozen):
    frozen()
    peer = TcpPeer(stack, APP, DEST, sport=41004, dport=8080)
    peer.syn()
    assert stack.events() == []
    frozen.thaw()
    (request,) = stack.events()
    assert isinstance(request, TcpConnectRequest)
    assert request.flow.src == (APP, 41004) and request.flow.dst == (DEST, 8080)
    request.flow.accept()
    deliver(stack, [peer])
    assert peer.got_synack and not peer.got_rst


def test_many_flows_closing_while_frozen_all_reach_python(stack, frozen):
    peers = [TcpPeer(stack, APP, DEST, sport=42000 + i) for i in range(50)]
    flows = [connect(stack, p) for p in peers]
    frozen()
    for p in peers:
        p.rst()
    assert stack.events() == []
    frozen.thaw()
    closed = stack.events()
    assert {e.flow.id for e in closed if isinstance(e, TcpClosed)} == {f.id for f in flows}
    assert stack.stats()["flows_live"] == 0


def test_a_datagram_that_finds_no_room_is_dropped_and_counted(stack, frozen):
    frozen()
    before = stack.stats()["dropped_other"]
    stack.receive_packet(bytes(IP(src=APP, dst=DEST) / UDP(sport=5353, dport=53) / b"q"))
    assert stack.stats()["dropped_other"] == before + 1
    frozen.thaw()
    assert stack.events() == []
    stack.receive_packet(bytes(IP(src=APP, dst=DEST) / UDP(sport=5353, dport=53) / b"q"))
    assert [type(e) for e in stack.events()] == [UdpDatagram]
