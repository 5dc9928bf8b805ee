"""Received bytes survive the end of the connection, and more than 64 KiB of them are counted right.

1. The app sends data and FIN; the consumer, not reading yet (its upstream is full), shuts down; the app's
   ACK of our FIN completes the close (lwIP: LAST_ACK, then the err callback with ERR_CLSD and the pcb
   freed). Before the fix the unread bytes were freed with the pcb and the flow was released at once: the
   consumer got ``TcpClosed(NORMAL)`` and never saw the data. A reset still drops them.
2. More than 64 KiB unread: received segments were chained with lwIP's ``pbuf_cat``, whose 16-bit
   ``tot_len`` wraps; the close then reopened too small a window and lwIP answered with a RST, not a FIN.
"""

from __future__ import annotations

import os

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack import (
    CloseReason,
    FlowClosedError,
    TcpClosed,
    TcpDataReceived,
    TcpEndOfStream,
)
from tests.unit.tcp_peer import TcpPeer, connect, deliver

ADDRS = {4: ("198.18.0.2", "198.19.0.2"), 6: ("fd58:3278:7373:1::2", "fd58:3278:7373:2::9")}


def _flags(raw: bytes) -> str:
    pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
    return str(pkt[TCP].flags)


def _read_all(flow) -> bytes:
    got = bytearray()
    while chunk := flow.read():
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("family", [4, 6])
def test_a_graceful_close_completed_before_the_consumer_read_keeps_the_bytes(stack, family):
    peer = TcpPeer(stack, *ADDRS[family], sport=40101)
    flow = connect(stack, peer)
    request = os.urandom(30_000)
    peer.send(request)
    peer.fin()
    assert [type(e) for e in stack.events()] == [TcpDataReceived, TcpEndOfStream]
    flow.write(b"answer")
    flow.shutdown()  # our FIN: lwIP LAST_ACK; the app's ACK of it ends the connection in lwIP
    deliver(stack, [peer])
    assert peer.got_fin and not peer.got_rst and bytes(peer.received) == b"answer"
    assert stack.events() == []  # not closed yet: bytes wait to be read
    assert not flow.closed
    stats = stack.stats()
    assert stats["pcbs_active"] == 0 and stats["flows_live"] == 1, stats
    assert _read_all(flow) == request
    flow.ack(len(request))  # no pcb any more: accepted and ignored
    (closed,) = stack.events()  # the close, once everything was read
    assert isinstance(closed, TcpClosed) and closed.reason is CloseReason.NORMAL
    assert flow.closed and stack.stats()["flows_live"] == 0
    assert stack.packets_to_send() == []


def test_the_close_comes_after_the_last_of_several_reads(stack):
    peer = TcpPeer(stack, *ADDRS[4], sport=40102)
    flow = connect(stack, peer)
    request = os.urandom(5000)
    peer.send(request)
    peer.fin()
    flow.shutdown()
    deliver(stack, [peer])
    stack.events()
    first = flow.read(3000)
    assert stack.events() == []  # 2000 bytes still wait
    rest = flow.read()
    assert first + rest == request
    assert [type(e) for e in stack.events()] == [TcpClosed]


def test_releasing_the_finished_flow_before_reading_frees_everything(stack):
    peer = TcpPeer(stack, *ADDRS[4], sport=40103)
    flow = connect(stack, peer)
    peer.send(os.urandom(20_000))
    peer.fin()
    flow.shutdown()
    deliver(stack, [peer])
    stack.events()
    base = stack.memory_in_use()
    flow.close()  # the consumer gives up on the bytes: its choice, and nothing is left behind
    assert stack.memory_in_use() < base - 19_000
    assert stack.events() == [] and stack.packets_to_send() == []
    stats = stack.stats()
    assert stats["flows_live"] == 0 and stats["pcbs_active"] == 0, stats


def test_a_reset_from_the_app_still_drops_unread_bytes(stack):
    peer = TcpPeer(stack, *ADDRS[4], sport=40104)
    flow = connect(stack, peer)
    peer.send(os.urandom(10_000))
    stack.events()
    peer.rst()
    (closed,) = stack.events()
    assert isinstance(closed, TcpClosed) and closed.reason is CloseReason.RESET
    with pytest.raises(FlowClosedError):
        flow.read()
    assert stack.stats()["flows_live"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_closing_with_more_than_64k_unread_sends_fin_not_rst(stack, family):
    peer = TcpPeer(stack, *ADDRS[family], sport=40105)
    flow = connect(stack, peer)
    peer.send(os.urandom(100_000), segment=8000)  # tot_len of one chain: 100000 mod 65536 = 34464
    assert [type(e) for e in stack.events()] == [TcpDataReceived]
    deliver(stack, [peer])
    flow.close()
    out = stack.packets_to_send()
    assert [_flags(raw) for raw in out] == ["FA"], [_flags(raw) for raw in out]


def test_more_than_64k_unread_is_read_back_whole(stack):
    peer = TcpPeer(stack, *ADDRS[4], sport=40106)
    flow = connect(stack, peer)
    sent = os.urandom(300_000)
    peer.send(sent, segment=8000)
    stack.events()
    got = bytearray()
    while chunk := flow.read(70_000):  # reads that end inside a segment and span several
        got += chunk
    assert bytes(got) == sent
    flow.ack(len(got))
    peer.fin()
    flow.shutdown()
    deliver(stack, [peer])
    assert peer.got_fin and not peer.got_rst
