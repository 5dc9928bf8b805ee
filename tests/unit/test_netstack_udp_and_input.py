"""UDP in and out, ICMP policy, and hostile input against the sans-IO netstack."""

from __future__ import annotations

import os
import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw, fuzz

from netstack import LocalProtocolError, Stack, StackConfig, TcpConnectRequest, UdpDatagram
from tests.unit.tcp_peer import checksums_ok

STACK_MTU = 9000  # the `stack` fixture (conftest.py)


@pytest.mark.parametrize(
    "src,dst", [("198.18.0.2", "198.19.3.4"), ("fd58:3278:7373:1::2", "fd58:3278:7373:2::53")]
)
def test_udp_datagram_becomes_event_with_addresses(stack, src, dst):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    payload = os.urandom(1200)
    stack.receive_packet(bytes(ip / UDP(sport=5353, dport=53) / Raw(payload)))
    (event,) = stack.events()
    assert event == UdpDatagram((src, 5353), (dst, 53), payload)


@pytest.mark.parametrize(
    "app,server", [("198.18.0.2", "198.19.3.4"), ("fd58:3278:7373:1::2", "fd58:3278:7373:2::53")]
)
@pytest.mark.parametrize("size", [0, 1, 512, 8900])
def test_udp_reply_is_well_formed(stack, app, server, size):
    payload = os.urandom(size)
    stack.udp_send((server, 53), (app, 40000), payload)
    (raw,) = stack.packets_to_send()
    assert checksums_ok(raw)
    pkt = IPv6(raw) if ":" in app else IP(raw)
    assert pkt.src == server and pkt.dst == app
    assert pkt[UDP].sport == 53 and pkt[UDP].dport == 40000
    assert bytes(pkt[UDP].payload) == payload


def test_udp_reply_larger_than_mtu_is_refused(stack):
    with pytest.raises(LocalProtocolError):
        stack.udp_send(("198.19.0.2", 53), ("198.18.0.2", 4000), b"x" * 9000)
    with pytest.raises(LocalProtocolError):
        stack.udp_send(("198.19.0.2", 53), ("fd58::1", 4000), b"x")
    assert stack.packets_to_send() == []


def test_udp_with_bad_checksum_is_dropped(stack):
    pkt = IP(src="198.18.0.2", dst="198.19.0.2") / UDP(sport=1, dport=2, chksum=0x1234) / Raw(b"data")
    stack.receive_packet(bytes(pkt))
    assert stack.events() == []
    assert stack.stats()["dropped_checksum"] == 1


def test_udp_without_checksum_is_accepted_on_ipv4(stack):
    pkt = IP(src="198.18.0.2", dst="198.19.0.2") / UDP(sport=1, dport=2, chksum=0) / Raw(b"data")
    stack.receive_packet(bytes(pkt))
    (event,) = stack.events()
    assert event.payload == b"data"


@pytest.mark.parametrize(
    "packet",
    [
        IP(src="198.18.0.2", dst="198.19.0.2") / ICMP() / Raw(b"ping"),
        IPv6(src="fd58::2", dst="fd58::1") / ICMPv6EchoRequest(data=b"ping"),
    ],
    ids=["icmp", "icmpv6"],
)
def test_no_fake_pings(stack, packet):
    """An echo request becomes an event for the agent; the stack itself never answers it."""
    stack.receive_packet(bytes(packet))
    assert stack.packets_to_send() == []
    assert [type(e).__name__ for e in stack.events()] == ["IcmpEchoRequest"]


def test_fragments_are_dropped(stack):
    v4 = IP(src="198.18.0.2", dst="198.19.0.2", flags="MF") / UDP(sport=1, dport=2) / Raw(b"x" * 100)
    v6 = (
        IPv6(src="fd58::2", dst="fd58::1") / IPv6ExtHdrFragment(m=1) / UDP(sport=1, dport=2) / Raw(b"x" * 100)
    )
    stack.receive_packet(bytes(v4))
    stack.receive_packet(bytes(v6))
    assert stack.events() == []
    assert stack.stats()["dropped_fragment"] == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x45",
        b"\x60" + b"\x00" * 10,
        bytes(IP(src="198.18.0.2", dst="198.19.0.2") / TCP())[:30],  # truncated
        bytes(IP(src="198.18.0.2", dst="198.19.0.2", len=2000) / TCP()),  # length lies
        bytes(IP(src="198.18.0.2", dst="198.19.0.2", ihl=15) / TCP()),  # header longer than packet
        bytes(IP(src="198.18.0.2", dst="198.19.0.2", chksum=1) / TCP(flags="S")),  # bad IP checksum
        bytes(IP(src="198.18.0.2", dst="198.19.0.2") / TCP(flags="S", chksum=1)),  # bad TCP checksum
        bytes(IP(src="198.18.0.2", dst="198.19.0.2") / TCP(flags="S", dataofs=15)),  # options beyond segment
        bytes(IP(src="198.18.0.2", dst="198.19.0.2") / TCP(flags="S", dport=0)),
        b"\x75" + bytes(IP(src="198.18.0.2", dst="198.19.0.2") / TCP())[1:],  # IP version 7
        bytes(IPv6(src="fd58::2", dst="fd58::1", plen=900) / UDP()),  # payload length lies
        bytes(IP(src="198.18.0.2", dst="198.19.0.2") / UDP(len=3)),  # UDP length too short
        bytes(IP(src="198.18.0.2", dst="255.255.255.255") / TCP(flags="S")),  # broadcast
        bytes(IPv6(src="fd58::2", dst="ff02::1") / TCP(flags="S")),  # multicast
        bytes(IPv6(src="fd58::2", dst="::ffff:198.19.0.2") / TCP(flags="S")),  # IPv4-mapped
        os.urandom(70_000),  # larger than any IP packet
    ],
)
def test_malformed_packets_are_dropped_without_effect(stack, raw):
    stack.receive_packet(raw)
    assert stack.events() == []
    assert stack.packets_to_send() == []
    assert stack.stats()["flows_live"] == 0


def test_random_and_fuzzed_packets_never_crash_or_leak():
    """>= 100,000 malformed packets: random bytes, scapy-fuzzed headers, and mutated valid packets."""
    rng = random.Random(20261125)
    templates = [
        IP(src="198.18.0.2", dst="198.19.0.2") / TCP(flags="S", sport=1234, dport=80),
        IP(src="198.18.0.2", dst="198.19.0.2") / TCP(flags="PA", sport=1234, dport=80) / Raw(b"x" * 64),
        IP(src="198.18.0.2", dst="198.19.0.2") / UDP(sport=53, dport=53) / Raw(b"q" * 32),
        IPv6(src="fd58::2", dst="fd58::1") / TCP(flags="S", sport=1234, dport=80),
        IPv6(src="fd58::2", dst="fd58::1") / UDP(sport=53, dport=53) / Raw(b"q" * 32),
    ]
    valid = [bytes(t) for t in templates]
    fuzzed = [bytes(fuzz(t.copy())) for t in templates for _ in range(400)]
    with Stack(StackConfig(max_flows=20_000), clock="manual") as stack:
        base = stack.stats()["mem_in_use"]
        total = 0
        for i in range(100_000):
            choice = i % 4
            if choice == 0:
                raw = rng.randbytes(rng.randint(0, 200))
                if raw:  # keep the version nibble plausible half of the time
                    raw = bytes([rng.choice((0x45, 0x60, raw[0]))]) + raw[1:]
            elif choice == 1:
                raw = rng.choice(fuzzed)
            elif choice == 2:
                buf = bytearray(rng.choice(valid))
                for _ in range(rng.randint(1, 4)):
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
                raw = bytes(buf)
            else:
                raw = rng.choice(valid)[: rng.randint(0, 60)]
            stack.receive_packet(raw)
            total += bool(raw)
            if i % 1000 == 0:
                for event in stack.events():
                    if isinstance(event, TcpConnectRequest):
                        event.flow.refuse()
                stack.packets_to_send()
        for event in stack.events():
            if isinstance(event, TcpConnectRequest):
                event.flow.refuse()
        stack.packets_to_send()
        for t in range(1, 30):
            stack.handle_timer(t)
        stats = stack.stats()
        assert total > 90_000 and stats["packets_in"] == total
        assert stats["flows_live"] == 0 and stats["pcbs_active"] == 0
        assert stats["mem_in_use"] <= base + 4096 * stats["listeners"]
