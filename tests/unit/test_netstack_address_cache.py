"""The address conversions netstack caches per datagram: right for every address, bounded, errors uncached.

Many distinct addresses (more than the cache holds) go both ways through a real stack: each datagram's
event carries its own addresses and each reply is addressed as asked, while the caches never grow past
``ADDRESS_CACHE``.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from netstack import LocalProtocolError, TcpConnectRequest, UdpDatagram
from netstack import stack as stack_module


@pytest.fixture(autouse=True)
def empty_caches(monkeypatch):
    # Tests run before these (test_netstack_tcp.py, say) leave the module's caches fuller than the lowered
    # ADDRESS_CACHE, and the bound is applied only as an entry is added: start empty, whatever the order.
    for name in ("_names", "_packed_cache", "_udp_pairs", "_udp_hosts", "_tcp_hosts"):
        monkeypatch.setattr(stack_module, name, {})


STACK_MTU = 9000  # the `stack` fixture (conftest.py)


def _hosts(count: int) -> list[str]:
    v4 = ipaddress.ip_address("198.19.0.0")
    v6 = ipaddress.ip_address("fd58:3278:7373:2::")
    return [str(v4 + i) if i % 2 else str(v6 + i) for i in range(count)]


def test_many_addresses_in_stay_right_and_bounded(stack, monkeypatch):
    monkeypatch.setattr(stack_module, "ADDRESS_CACHE", 64)
    for i, dst in enumerate(_hosts(300) * 2):
        src = "198.18.0.2" if ":" not in dst else "fd58:3278:7373:1::2"
        ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
        stack.receive_packet(bytes(ip / UDP(sport=1000 + i, dport=53) / Raw(b"q")))
        (event,) = stack.events()
        assert event == UdpDatagram((src, 1000 + i), (dst, 53), b"q")
        assert len(stack_module._names) <= 64
        assert len(stack_module._udp_pairs) <= 64


def test_one_batch_of_many_flows_keeps_each_datagrams_own_pair(stack, monkeypatch):
    # The (src, dst) pairs are cached by each event's raw tuple bytes within one batch: flows that differ
    # only in a port, in the family or in one address byte each get their own pair, at every batch index.
    monkeypatch.setattr(stack_module, "ADDRESS_CACHE", 8)
    sent = []
    for round_ in range(3):
        for i in range(40):
            v6 = i % 3 == 0
            src = "fd58:3278:7373:1::2" if v6 else "198.18.0.2"
            dst = f"fd58:3278:7373:2::{i % 5 + 1}" if v6 else f"198.19.0.{i % 5}"
            sport, dport = 5000 + i % 7, 53 + i % 2
            ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
            payload = f"{round_}-{i}".encode()
            stack.receive_packet(bytes(ip / UDP(sport=sport, dport=dport) / Raw(payload)))
            sent.append(UdpDatagram((src, sport), (dst, dport), payload))
    assert stack.events() == sent
    assert len(stack_module._udp_pairs) <= 8


def test_many_addresses_out_stay_right_and_bounded(stack, monkeypatch):
    monkeypatch.setattr(stack_module, "ADDRESS_CACHE", 64)
    for server in _hosts(300) * 2:
        app = "198.18.0.2" if ":" not in server else "fd58:3278:7373:1::2"
        stack.udp_send((server, 53), (app, 40000), b"answer")
        (raw,) = stack.packets_to_send()
        pkt = IPv6(raw) if ":" in server else IP(raw)
        assert (pkt.src, pkt.dst, bytes(pkt[UDP].payload)) == (server, app, b"answer")
        assert len(stack_module._packed_cache) <= 64
        assert len(stack_module._udp_hosts) <= 64


def test_mixed_families_out_are_refused_every_time_and_never_cached(stack):
    for _ in range(2):
        with pytest.raises(LocalProtocolError, match="families differ"):
            stack.udp_send(("fd58:3278:7373:2::5", 53), ("198.18.0.2", 40000), b"x")
    assert ("fd58:3278:7373:2::5", "198.18.0.2") not in stack_module._udp_hosts
    assert stack.packets_to_send() == []


@pytest.mark.parametrize("bad", ["198.19.0.256", "fd58::1::2", "", "example.com", b"\xc6\x13\x00\x02"])
def test_a_bad_address_is_a_clear_error_every_time(stack, bad):
    for _ in range(2):  # the second time too: a failed conversion is not cached
        with pytest.raises(LocalProtocolError):
            stack.udp_send((bad, 53), ("198.18.0.2", 40000), b"x")
    assert bad not in stack_module._packed_cache
    assert stack.packets_to_send() == []


def test_one_batch_of_many_connections_keeps_each_connections_own_addresses(stack, monkeypatch):
    # A new connection's hosts are cached by the event's raw family and address bytes: connections that
    # differ in a port, the family or one address byte each get their own, at every batch index, and the
    # cache stays bounded.
    monkeypatch.setattr(stack_module, "ADDRESS_CACHE", 8)
    sent = []
    for i in range(120):
        v6 = i % 3 == 0
        src = f"fd58:3278:7373:1::{i % 4 + 1}" if v6 else f"198.18.0.{i % 4 + 1}"
        dst = f"fd58:3278:7373:2::{i % 5 + 1}" if v6 else f"198.19.0.{i % 5}"
        sport, dport = 20000 + i, 80 + i % 2
        ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
        stack.receive_packet(bytes(ip / TCP(sport=sport, dport=dport, flags="S", seq=1)))
        sent.append(((src, sport), (dst, dport)))
    events = stack.events()
    assert all(isinstance(event, TcpConnectRequest) for event in events)
    assert [(event.flow.src, event.flow.dst) for event in events] == sent
    assert len(stack_module._tcp_hosts) <= 8
