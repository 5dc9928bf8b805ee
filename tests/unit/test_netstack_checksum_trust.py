"""`StackConfig.verify_checksums`: by default a TCP or UDP packet with a wrong checksum is dropped; with the
setting off (packets from the local kernel through a TUN) the checksum is not computed again, so such a
packet is taken. Headers are checked either way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from netstack import Stack, StackConfig, TcpConnectRequest, TcpDataReceived, UdpDatagram
from tests.unit.tcp_peer import TcpPeer, connect


@pytest.fixture(params=[True, False], ids=["verified", "trusted"])
def any_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    s = Stack(StackConfig(mtu=16000, verify_checksums=request.param), clock="manual")
    yield s
    s.close()


def _corrupt(raw: bytes) -> bytes:
    """The packet with its last payload byte changed (so the checksum no longer matches)."""
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


def test_a_data_segment_with_a_wrong_checksum(any_stack):
    peer = TcpPeer(any_stack, "198.18.0.2", "198.19.0.2")
    flow = connect(any_stack, peer)
    any_stack.events()
    any_stack.receive_packet(_corrupt(peer._pkt("PA", b"payload")))
    taken = any(isinstance(e, TcpDataReceived) for e in any_stack.events())
    verified = any_stack.config.verify_checksums
    assert taken is not verified
    assert flow.read() == (b"" if verified else b"payloa" + bytes([ord("d") ^ 0xFF]))


def test_a_syn_with_a_wrong_checksum(any_stack):
    peer = TcpPeer(any_stack, "198.18.0.2", "198.19.0.2")
    peer.syn()
    assert [type(e) for e in any_stack.events()] == [TcpConnectRequest]
    other = TcpPeer(any_stack, "198.18.0.2", "198.19.0.2")
    syn = IP(other._pkt("S"))
    syn[TCP].chksum ^= 0x5555
    any_stack.receive_packet(bytes(syn))
    got = [type(e) for e in any_stack.events()]
    assert got == ([] if any_stack.config.verify_checksums else [TcpConnectRequest])


def test_a_udp_datagram_with_a_wrong_checksum(any_stack):
    pkt = IP(src="198.18.0.2", dst="198.19.0.2") / UDP(sport=1, dport=2, chksum=0x1234) / Raw(b"data")
    any_stack.receive_packet(bytes(pkt))
    events = any_stack.events()
    if any_stack.config.verify_checksums:
        assert events == [] and any_stack.stats()["dropped_checksum"] == 1
    else:
        assert events == [UdpDatagram(("198.18.0.2", 1), ("198.19.0.2", 2), b"data")]


def test_malformed_headers_are_dropped_either_way(any_stack):
    pkt = bytes(IP(src="198.18.0.2", dst="198.19.0.2") / UDP(sport=1, dport=2) / Raw(b"data"))
    bad_length = pkt[:24] + (200).to_bytes(2, "big") + pkt[26:]  # UDP length beyond the packet
    any_stack.receive_packet(bad_length)
    assert any_stack.events() == []
    assert any_stack.stats()["dropped_malformed"] == 1
