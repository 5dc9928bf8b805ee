"""ACK timing: the link to the app is local, so the stack acknowledges at once instead of on lwIP's 250 ms
delayed-ACK timer. No test here ever runs the stack's timers: every ACK asserted is one sent in direct
response to the app's data or to the consumer taking it."""

from __future__ import annotations

from itertools import pairwise

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack import Stack, TcpDataReceived
from tests.unit.tcp_peer import TcpPeer, connect


def acks_sent(stack: Stack, peer: TcpPeer) -> list[int]:
    """Acknowledgement numbers of the packets the stack sent to `peer` (and hands them to it)."""
    acks = []
    for raw in stack.packets_to_send():
        pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
        if "A" in str(pkt[TCP].flags):
            acks.append(pkt[TCP].ack)
        peer.handle(raw)
    return acks


@pytest.mark.parametrize("src,dst", [("198.18.0.2", "198.19.0.2"), ("fd58:3278:7373:1::2", "fd58::9")])
def test_end_of_a_write_is_acknowledged_at_once(stack, src, dst):
    """A segment with PSH (the app's write ended; with Nagle it may now wait for our ACK) is ACKed in
    the same input call, even while the consumer has not read it yet."""
    peer = TcpPeer(stack, src, dst)
    connect(stack, peer)
    peer.auto_ack = False
    peer.send(b"GET ", push=True)
    assert peer.seq in acks_sent(stack, peer)


def test_consumer_taking_the_bytes_sends_the_ack(stack):
    """Data without PSH may wait for more, but once the consumer acknowledges it, the ACK goes out."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    peer.auto_ack = False
    peer.send(b"partial write", push=False)
    pending = acks_sent(stack, peer)  # lwIP may hold its ACK for its timer here: that is what we fix
    assert any(isinstance(e, TcpDataReceived) for e in stack.events())
    data = flow.read()
    assert data == b"partial write"
    flow.ack(len(data))
    assert peer.seq in pending + acks_sent(stack, peer)


def test_write_write_read_with_nagle_completes_without_timers(stack):
    """The Nagle pattern: the app writes a header, holds its second small write until the first is
    acknowledged, then waits for the answer. Each step must be driven by packets alone."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    peer.auto_ack = False
    for round_no in range(5):
        peer.send(b"HEAD%d" % round_no)
        stack.events()
        got = flow.read()
        flow.ack(len(got))
        assert peer.seq in acks_sent(stack, peer), "the 2nd write would wait for lwIP's timer"
        peer.send(b"BODY%d" % round_no)  # the held second segment, released by our ACK
        stack.events()
        got += flow.read()
        flow.ack(len(got) - 5)
        assert got == b"HEAD%dBODY%d" % (round_no, round_no)
        flow.write(b"answer%d" % round_no)
        before = len(peer.received)
        acks_sent(stack, peer)
        assert bytes(peer.received[before:]) == b"answer%d" % round_no
        peer.ack_now()  # the app's ACK for the answer (it would normally ride on its next request)
        stack.packets_to_send()


def test_quick_acks_do_not_duplicate_acks_in_bulk(stack):
    """Consumer ACKs only fire when an ACK is owed: a bulk upload must not draw duplicate ACKs (three
    would make the app's kernel retransmit for nothing)."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2", mss=8000)
    flow = connect(stack, peer)
    peer.auto_ack = False
    seen: list[tuple[int, int]] = []
    for _ in range(20):
        peer.send(bytes(32000), segment=8000)
        for raw in stack.packets_to_send():
            tcp = IP(raw)[TCP]
            seen.append((tcp.ack, tcp.window))
        stack.events()
        while data := flow.read():
            flow.ack(len(data))
        for raw in stack.packets_to_send():
            tcp = IP(raw)[TCP]
            seen.append((tcp.ack, tcp.window))
    duplicates = sum(1 for a, b in pairwise(seen) if a == b)
    assert duplicates == 0, seen
    assert seen[-1][0] == peer.seq
