"""TCP through the sans-IO netstack, driven by scapy-made packets from scripted app endpoints."""

from __future__ import annotations

import ipaddress
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack import (
    CloseReason,
    FlowClosedError,
    LocalProtocolError,
    Stack,
    StackBusyError,
    StackConfig,
    TcpClosed,
    TcpDataReceived,
    TcpEndOfStream,
    TcpWritable,
)
from tests.unit.tcp_peer import TcpPeer, connect, deliver


def drain(flow, stack: Stack) -> bytes:
    data = bytearray()
    while chunk := flow.read():
        data += chunk
        flow.ack(len(chunk))
    return bytes(data)


unicast_v4 = st.ip_addresses(v=4).filter(lambda a: not (a.is_multicast or a.is_reserved or a.packed[0] == 0))
unicast_v6 = st.ip_addresses(v=6).filter(lambda a: not (a.is_multicast or a.is_unspecified or a.ipv4_mapped))


@settings(max_examples=40, deadline=None)
@given(dst=st.one_of(unicast_v4, unicast_v6), port=st.integers(1, 65535))
def test_handshake_to_any_destination(dst, port):
    with Stack(clock="manual") as stack:
        src = "198.18.0.2" if dst.version == 4 else "fd58:3278:7373:1::2"
        peer = TcpPeer(stack, src, str(dst), dport=port)
        flow = connect(stack, peer)
        assert flow.src == (src, peer.sport)
        assert ipaddress.ip_address(flow.dst[0]) == dst and flow.dst[1] == port
        peer.send(b"hello")
        deliver(stack, [peer])
        stack.events()
        assert flow.read() == b"hello"
        flow.abort()
        deliver(stack, [peer])
        assert peer.got_rst


@pytest.mark.parametrize(
    "src,dst", [("198.18.0.2", "198.19.7.9"), ("fd58:3278:7373:1::2", "fd58:3278:7373:2::9")]
)
def test_data_both_ways_byte_exact(stack, src, dst):
    peer = TcpPeer(stack, src, dst, dport=443)
    flow = connect(stack, peer)
    upload = os.urandom(200_000)
    peer.send(upload)
    deliver(stack, [peer])
    assert any(isinstance(e, TcpDataReceived) for e in stack.events())
    assert drain(flow, stack) == upload

    download = os.urandom(300_000)
    sent = 0
    for _ in range(200):
        if sent < len(download):
            sent += flow.write(download[sent:])
        deliver(stack, [peer])
        stack.events()
        if len(peer.received) == len(download):
            break
    assert bytes(peer.received) == download


def test_half_close_app_fin_then_data_still_flows_to_app(stack):
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    peer.send(b"request")
    peer.fin()
    deliver(stack, [peer])
    kinds = [type(e) for e in stack.events()]
    assert kinds == [TcpDataReceived, TcpEndOfStream]
    assert drain(flow, stack) == b"request"
    assert flow.eof_received
    # The other direction is still open: the reply arrives after the app's FIN.
    assert flow.write(b"response") == 8
    deliver(stack, [peer])
    assert bytes(peer.received) == b"response"
    flow.shutdown()
    deliver(stack, [peer])
    assert peer.got_fin
    events = stack.events()
    assert [type(e) for e in events] == [TcpClosed] and events[0].reason is CloseReason.NORMAL


def test_half_close_our_fin_then_app_keeps_sending(stack):
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    flow.write(b"bye")
    flow.shutdown()
    deliver(stack, [peer])
    assert peer.got_fin and bytes(peer.received) == b"bye"
    with pytest.raises(LocalProtocolError):
        flow.write(b"more")
    peer.send(b"late data")
    deliver(stack, [peer])
    assert drain(flow, stack) == b"late data"
    peer.fin()
    deliver(stack, [peer])
    assert any(isinstance(e, TcpEndOfStream) for e in stack.events())
    flow.close()
    assert not peer.got_rst


def test_rst_from_app_closes_flow(stack):
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    peer.rst()
    events = stack.events()
    assert [type(e) for e in events] == [TcpClosed]
    assert events[0].reason is CloseReason.RESET and flow.closed
    with pytest.raises(FlowClosedError):
        flow.write(b"x")


def test_abort_sends_rst_to_app(stack):
    peer = TcpPeer(stack, "fd58:3278:7373:1::2", "fd58:3278:7373:2::2")
    flow = connect(stack, peer)
    flow.abort()
    deliver(stack, [peer])
    assert peer.got_rst and flow.closed
    assert stack.stats()["flows_live"] == 0


def test_deferred_accept_holds_syn_and_ignores_retransmits(stack):
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    peer.syn()
    (request,) = stack.events()
    assert stack.packets_to_send() == []  # nothing answered while the consumer decides
    peer.syn()  # the app retransmits its SYN
    assert stack.events() == [] and stack.packets_to_send() == []
    request.flow.accept()
    deliver(stack, [peer])
    assert peer.got_synack
    with pytest.raises(LocalProtocolError):
        request.flow.accept()


def test_deferred_accept_then_refuse_gives_rst(stack):
    peer = TcpPeer(stack, "fd58:3278:7373:1::2", "fd58:3278:7373:2::7", dport=25)
    flow = connect(stack, peer, accept=False)
    flow.refuse()
    deliver(stack, [peer])
    assert peer.got_rst and not peer.got_synack
    assert stack.stats()["flows_live"] == 0
    assert stack.stats()["tcp_refused"] == 1


def test_receive_window_closes_until_consumer_acks(stack):
    """Backpressure app -> consumer: unacknowledged bytes shrink the window the app sees to zero."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2", mss=8000)
    flow = connect(stack, peer)
    windows = []
    data = os.urandom(4 * 1024 * 1024)
    sent = 0
    for _ in range(2000):
        peer.send(data[sent : sent + 64000], segment=8000)
        sent += 64000
        for raw in stack.packets_to_send():
            windows.append(IP(raw)[TCP].window)
        stack.events()
        if windows and windows[-1] == 0:
            break
    assert windows[-1] == 0, "the window never closed although nothing was acknowledged"
    received = 0
    while chunk := flow.read():
        received += len(chunk)
    assert received <= 1024 * 1024 + 64000  # bounded by TCP_WND, not by what the app sent
    flow.ack(received)
    update = [IP(raw)[TCP].window for raw in stack.packets_to_send()]
    assert update and update[-1] > 0, "acknowledging bytes must reopen the window"


def test_short_write_then_writable_event(stack):
    """Backpressure consumer -> app: a full send buffer takes less, and a TcpWritable says when to retry."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2", mss=8000)
    peer.auto_ack = False
    flow = connect(stack, peer)
    big = os.urandom(4 * 1024 * 1024)
    taken = flow.write(big)
    assert 0 < taken < len(big)
    assert flow.write(big[taken:]) == 0
    writable = False
    for _ in range(500):  # the app reads and acknowledges; the send buffer drains
        deliver(stack, [peer])
        peer.ack_now()
        if any(isinstance(e, TcpWritable) for e in stack.events()):
            writable = True
            break
    assert writable
    assert bytes(peer.received) == big[: len(peer.received)]
    assert flow.write(big[taken:]) > 0


def test_two_thousand_concurrent_flows_leave_nothing_behind(stack):
    base = stack.stats()["mem_in_use"]
    peers, flows = [], []
    for i in range(2000):
        dst = f"198.19.{i // 250}.{i % 250 + 1}" if i % 2 else f"fd58:3278:7373:2::{i:x}"
        src = "198.18.0.2" if i % 2 else "fd58:3278:7373:1::2"
        peer = TcpPeer(stack, src, dst, sport=10000 + i, dport=1000 + i % 7)
        peer.syn()
        (request,) = stack.events()
        request.flow.accept()
        peers.append(peer)
        flows.append(request.flow)
    by_port = {p.sport: p for p in peers}

    def pump():
        for raw in stack.packets_to_send():
            pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
            by_port[pkt[TCP].dport].handle(raw)

    pump()
    assert all(p.got_synack for p in peers)
    assert stack.stats()["flows_live"] == 2000
    for peer, flow in zip(peers, flows, strict=True):
        peer.send(b"ping")
        flow.write(b"pong")
    pump()
    stack.events()
    for peer, flow in zip(peers, flows, strict=True):
        assert flow.read() == b"ping"
        flow.ack(4)
        assert bytes(peer.received) == b"pong"
        peer.fin()
        flow.close()
    pump()
    stack.events()
    for t in range(1, 40):  # run the clock past TIME_WAIT
        stack.handle_timer(t * 0.25)
        pump()
    stats = stack.stats()
    assert stats["flows_live"] == 0 and stats["pcbs_active"] == 0 and stats["pcbs_time_wait"] == 0
    assert stats["mem_in_use"] <= base + 4096 * stats["listeners"], stats


def test_syn_beyond_flow_limit_is_reset():
    with Stack(StackConfig(max_flows=3), clock="manual") as stack:
        peers = [TcpPeer(stack, "198.18.0.2", "198.19.0.2", sport=30000 + i) for i in range(5)]
        for p in peers:
            p.syn()
        assert len(stack.events()) == 3
        deliver(stack, peers)
        assert [p.got_rst for p in peers] == [False, False, False, True, True]
        assert stack.stats()["tcp_over_limit"] == 2


def test_retransmission_timeout_reports_closed():
    with Stack(clock="manual") as stack:
        peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
        peer.auto_ack = False
        flow = connect(stack, peer)
        flow.write(b"never acknowledged")
        events = []
        for t in range(1, 2000):
            stack.handle_timer(t * 0.25)
            stack.packets_to_send()
            events += stack.events()
            if events:
                break
        assert [type(e) for e in events] == [TcpClosed]
        assert events[0].reason is CloseReason.TIMEOUT


def test_only_one_stack_per_process(stack):
    with pytest.raises(StackBusyError):
        Stack()


def test_random_order_of_many_small_writes_stays_byte_exact(stack):
    rng = random.Random(7)
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    expected = bytearray()
    for _ in range(300):
        chunk = os.urandom(rng.randint(1, 3000))
        assert flow.write(chunk) == len(chunk)
        expected += chunk
        if rng.random() < 0.3:
            deliver(stack, [peer])
    deliver(stack, [peer])
    assert bytes(peer.received) == bytes(expected)


def test_time_wait_of_a_released_flow_is_freed_at_once(stack):
    """We close first (an HTTP server's way), the app's FIN completes the close: no pcb lingers in
    TIME_WAIT for lwIP to walk on every later SYN, and the same 4-tuple connects again at once."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2", sport=40001)
    flow = connect(stack, peer)
    flow.write(b"answer")
    flow.close()
    deliver(stack, [peer])
    assert peer.got_fin and bytes(peer.received) == b"answer"
    peer.fin()
    deliver(stack, [peer])
    stats = stack.stats()
    assert stats["pcbs_time_wait"] == 0 and stats["pcbs_active"] == 0, stats
    peer.fin()  # a retransmitted FIN (our last ACK lost) is answered by a RST: the app's close ends too
    deliver(stack, [peer])
    assert peer.got_rst
    again = TcpPeer(stack, "198.18.0.2", "198.19.0.2", sport=40001)
    assert connect(stack, again).dst == ("198.19.0.2", 80)


def test_writes_and_fin_of_one_turn_leave_as_one_segment(stack):
    """An HTTP/1.0 answer (data, then end of stream) costs the app one segment, not one per call."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = connect(stack, peer)
    flow.write(b"HTTP/1.0 200 OK\r\n\r\n")
    flow.write(b"body")
    flow.shutdown()
    out = stack.packets_to_send()
    assert len(out) == 1
    tcp = IP(out[0])[TCP]
    assert bytes(tcp.payload) == b"HTTP/1.0 200 OK\r\n\r\nbody" and "F" in str(tcp.flags)
    assert peer.handle(out[0]) and peer.got_fin


@pytest.mark.parametrize("size", [3, 300_000])
def test_data_and_fin_written_before_the_apps_handshake_ack_all_arrive(stack, size):
    """A server that speaks first and closes (its data and EOF reach us with the channel's confirmation):
    bytes and FIN written right after `accept`, before the app's ACK of our SYN-ACK, all arrive."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    peer.syn()
    (event,) = stack.events()
    flow = event.flow
    flow.accept()
    answer = os.urandom(size)
    taken = flow.write(answer)
    flow.shutdown()
    for now in range(1, 200):  # the app's ACK of the SYN-ACK comes only now; timers run meanwhile
        deliver(stack, [peer])
        if peer.got_fin:
            break
        stack.handle_timer(now * 0.25)
    assert taken == size
    assert bytes(peer.received) == answer
    assert peer.got_fin and not peer.got_rst


def _raw_event_count(stack: Stack) -> int:
    """Events the C core queued, before Python drops those of released flows (which hides a bug)."""
    from netstack.stack import lib

    return int(lib.ns_events(stack._ev_ptr, stack._arena_ptr))


def _closed_before_the_apps_handshake_ack(stack: Stack, peer: TcpPeer, answer: bytes):
    """Accept, answer and release the flow gracefully while lwIP still waits for the app's ACK."""
    peer.syn()
    (event,) = stack.events()
    flow = event.flow
    flow.accept()
    taken = flow.write(answer) if answer else 0
    flow.close()
    assert flow.closed and taken == len(answer)
    return flow


@pytest.mark.parametrize("size", [0, 3, 300_000])
def test_data_and_fin_of_a_flow_closed_before_the_apps_handshake_ack_all_arrive(stack, size):
    """The channel closes (graceful) before the app's ACK of our SYN-ACK: the bytes and FIN still all
    arrive, the released flow gets no event, and nothing is left once the app closes its side."""
    base = stack.stats()["mem_in_use"]
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    answer = os.urandom(size)
    _closed_before_the_apps_handshake_ack(stack, peer, answer)
    for now in range(1, 200):  # the app's ACK of the SYN-ACK comes only now; timers run meanwhile
        deliver(stack, [peer])
        assert _raw_event_count(stack) == 0
        if peer.got_fin:
            break
        stack.handle_timer(now * 0.25)
    assert bytes(peer.received) == answer
    assert peer.got_fin and not peer.got_rst
    peer.fin()
    deliver(stack, [peer])
    assert _raw_event_count(stack) == 0 and stack.events() == []
    stats = stack.stats()
    assert stats["flows_live"] == 0 and stats["pcbs_active"] == 0 and stats["pcbs_time_wait"] == 0, stats
    assert stats["mem_in_use"] <= base + 4096 * stats["listeners"], stats


def _hold_synack(stack: Stack, peer: TcpPeer) -> list[bytes]:
    """Take the stack's SYN-ACK for `peer` without answering it (the app's ACK is late); returns every
    packet the stack sent meanwhile."""
    out = stack.packets_to_send()
    (synack,) = [IP(raw)[TCP] for raw in out if str(IP(raw)[TCP].flags) == "SA"]
    peer.got_synack = True
    peer.seq = (peer.seq + 1) % 2**32
    peer.ack = (synack.seq + 1) % 2**32
    return out


def _nothing_left(stack: Stack) -> None:
    assert _raw_event_count(stack) == 0 and stack.events() == []
    stats = stack.stats()
    assert stats["flows_live"] == 0 and stats["pcbs_active"] == 0 and stats["pcbs_time_wait"] == 0, stats


def test_abort_before_the_apps_handshake_ack_resets_at_once(stack):
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    peer.syn()
    (event,) = stack.events()
    event.flow.accept()
    event.flow.write(b"never")
    event.flow.abort()
    out = stack.packets_to_send()  # no ACK from the app needed: the RST follows the SYN-ACK in this turn
    assert [str(IP(raw)[TCP].flags) for raw in out] == ["SA", "RA"]
    _nothing_left(stack)


def test_flow_closed_before_the_handshake_then_reset_by_the_app_is_freed_silently(stack):
    from netstack.stack import lib

    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    flow = _closed_before_the_apps_handshake_ack(stack, peer, b"answer")
    assert lib.ns_tcp_write(flow.id, b"x", 1) == lib.NS_ENOFLOW  # released: unknown to the API
    _hold_synack(stack, peer)
    peer.rst()
    _nothing_left(stack)  # lwIP freed the pcb: the released flow goes with it, and tells nobody
    assert stack.packets_to_send() == []


def test_flow_closed_before_a_handshake_that_never_completes_is_freed_silently(stack):
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    _closed_before_the_apps_handshake_ack(stack, peer, b"answer")
    synacks = 0
    for now in range(1, 800):  # the app is gone: lwIP retransmits the SYN-ACK, then gives up
        synacks += sum(str(IP(raw)[TCP].flags) == "SA" for raw in stack.packets_to_send())
        assert _raw_event_count(stack) == 0
        stack.handle_timer(now * 0.25)
    assert synacks > 1
    _nothing_left(stack)


def test_flow_closed_before_the_handshake_answers_a_retransmitted_syn_and_ack_with_data(stack):
    """The app lost our SYN-ACK and sends its SYN again: that is the same connection, not a new flow. Its
    ACK then carries data nobody will read: dropped, and the close stays graceful."""
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
    _closed_before_the_apps_handshake_ack(stack, peer, b"answer")
    stack.packets_to_send()  # the first SYN-ACK is lost
    peer.syn()
    assert _raw_event_count(stack) == 0 and stack.events() == []
    _hold_synack(stack, peer)
    peer.send(b"request")  # ACK of the SYN-ACK, with data
    deliver(stack, [peer])
    assert bytes(peer.received) == b"answer" and peer.got_fin and not peer.got_rst
    peer.fin()
    deliver(stack, [peer])
    _nothing_left(stack)


def test_stack_closed_with_a_deferred_close_pending_frees_everything():
    from netstack.stack import lib

    before = int(lib.ns_mem_in_use())
    with Stack(clock="manual") as stack:
        peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2")
        _closed_before_the_apps_handshake_ack(stack, peer, os.urandom(100_000))
        stack.packets_to_send()
    assert int(lib.ns_mem_in_use()) == before
