"""ICMP in the netstack (issue 11): echo requests out as events, real replies and unreachable errors back in.

Every packet the stack emits is parsed by scapy and compared field by field, checksums included; the
unreachable errors are also checked the way the kernel matches them to a socket (the quoted header).
"""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6
from scapy.packet import Raw

from netstack import IcmpEchoRequest, LocalProtocolError, Stack
from netstack.stack import UNREACH_HOST, UNREACH_NET, UNREACH_PORT, UNREACH_PROHIBITED
from tests.unit.tcp_peer import checksums_ok

APP4, TARGET4 = "100.100.83.1", "198.19.0.2"
APP6, TARGET6 = "fd78:7832:7373::1", "fd58:3278:7373:2::2"


STACK_MTU = 9000  # the `stack` fixture (conftest.py)


def folded_sum(data: bytes) -> int:
    """The one's-complement sum of 16-bit words: 0xFFFF over a region whose checksum is right."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def icmp_checksum_ok(raw: bytes) -> bool:
    if raw[0] >> 4 == 4:
        return folded_sum(raw[20:]) == 0xFFFF
    pseudo = raw[8:40] + struct.pack("!I3xB", len(raw) - 40, 58)
    return folded_sum(pseudo + raw[40:]) == 0xFFFF


def one_packet(stack: Stack) -> bytes:
    packets = stack.packets_to_send()
    assert len(packets) == 1, packets
    assert checksums_ok(packets[0])  # the IP header
    assert icmp_checksum_ok(packets[0])
    return packets[0]


@pytest.mark.parametrize("family", [4, 6])
def test_echo_request_becomes_an_event(stack, family):
    data = bytes(range(56))
    if family == 4:
        packet = IP(src=APP4, dst=TARGET4) / ICMP(type=8, id=0x1234, seq=7) / Raw(data)
        src, dst = APP4, TARGET4
    else:
        packet = IPv6(src=APP6, dst=TARGET6) / ICMPv6EchoRequest(id=0x1234, seq=7, data=data)
        src, dst = APP6, TARGET6
    stack.receive_packet(bytes(packet))
    assert stack.events() == [IcmpEchoRequest(src, dst, 0x1234, 7, data)]
    assert stack.packets_to_send() == []
    assert stack.stats()["icmp_echo_requests"] == 1


@pytest.mark.parametrize(
    "packet",
    [
        IP(src=APP4, dst=TARGET4) / ICMP(type=0, id=1, seq=1),  # a reply: not ours to relay
        IP(src=APP4, dst=TARGET4) / ICMP(type=8, code=1, id=1, seq=1),  # echo with a nonzero code
        IP(src=APP4, dst=TARGET4) / ICMP(type=13),  # timestamp request
        IPv6(src=APP6, dst=TARGET6) / ICMPv6EchoReply(id=1, seq=1),
        IPv6(src=APP6, dst=TARGET6) / ICMPv6PacketTooBig(),
    ],
    ids=["v4-reply", "v4-code", "v4-timestamp", "v6-reply", "v6-too-big"],
)
def test_other_icmp_is_dropped_and_counted(stack, packet):
    stack.receive_packet(bytes(packet))
    assert stack.events() == [] and stack.packets_to_send() == []
    assert stack.stats()["dropped_icmp"] == 1


def test_echo_with_a_bad_checksum_or_truncated_is_dropped(stack):
    good = bytearray(bytes(IP(src=APP4, dst=TARGET4) / ICMP(type=8, id=1, seq=1) / Raw(b"abcd")))
    good[-1] ^= 0xFF
    stack.receive_packet(bytes(good))
    v6 = bytearray(bytes(IPv6(src=APP6, dst=TARGET6) / ICMPv6EchoRequest(id=1, seq=1, data=b"abcd")))
    v6[-1] ^= 0xFF
    stack.receive_packet(bytes(v6))
    short = bytes(IP(src=APP4, dst=TARGET4, proto=1) / Raw(b"\x08\x00\x00"))
    stack.receive_packet(short)
    assert stack.events() == []
    stats = stack.stats()
    assert stats["dropped_checksum"] == 2 and stats["dropped_malformed"] == 1


def test_icmpv4_inside_ipv6_is_not_an_echo(stack):
    stack.receive_packet(bytes(IPv6(src=APP6, dst=TARGET6, nh=1) / ICMP(type=8, id=1, seq=1)))
    assert stack.events() == [] and stack.stats()["dropped_icmp"] == 1


def test_echo_reply_v4_is_exact(stack):
    data = b"\x01\x02" * 28
    stack.icmp_echo_reply(TARGET4, APP4, 0x1234, 7, data)
    raw = one_packet(stack)
    pkt = IP(raw)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.ttl, pkt.len) == (TARGET4, APP4, 1, 64, 20 + 8 + len(data))
    icmp = pkt[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq, bytes(icmp.payload)) == (0, 0, 0x1234, 7, data)


def test_echo_reply_v6_is_exact(stack):
    data = b"x" * 100
    stack.icmp_echo_reply(TARGET6, APP6, 0xBEEF, 65535, data)
    pkt = IPv6(one_packet(stack))
    assert (pkt.src, pkt.dst, pkt.nh, pkt.hlim, pkt.plen) == (TARGET6, APP6, 58, 64, 8 + len(data))
    reply = pkt[ICMPv6EchoReply]
    assert (reply.type, reply.code, reply.id, reply.seq, reply.data) == (129, 0, 0xBEEF, 65535, data)


@pytest.mark.parametrize(
    ("code", "icmp_code"),
    [(UNREACH_PORT, 3), (UNREACH_HOST, 1), (UNREACH_NET, 0), (UNREACH_PROHIBITED, 13)],
)
def test_udp_unreachable_v4_quotes_the_apps_datagram(stack, code, icmp_code):
    stack.icmp_unreachable(TARGET4, (APP4, 40000), (TARGET4, 9), code)
    raw = one_packet(stack)
    expected_len = 20 + 8 + 20 + 8
    assert len(raw) == expected_len
    pkt = IP(raw)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.len) == (TARGET4, APP4, 1, expected_len)
    icmp = pkt[ICMP]
    assert (icmp.type, icmp.code, raw[24:28]) == (3, icmp_code, bytes(4))
    quoted = raw[28:]  # the original as the app sent it: IP header, then the UDP header
    inner = IP(quoted[:20] + bytes(8))
    assert (inner.src, inner.dst, inner.proto, inner.ihl, inner.len, inner.ttl) == (
        APP4,
        TARGET4,
        17,
        5,
        28,
        64,
    )
    assert folded_sum(quoted[:20]) == 0xFFFF  # the quoted IP header's own checksum
    assert struct.unpack("!HHH", quoted[20:26]) == (40000, 9, 8)


@pytest.mark.parametrize(
    ("code", "icmp_code"),
    [(UNREACH_PORT, 4), (UNREACH_HOST, 3), (UNREACH_NET, 0), (UNREACH_PROHIBITED, 1)],
)
def test_udp_unreachable_v6_quotes_the_apps_datagram(stack, code, icmp_code):
    stack.icmp_unreachable(TARGET6, (APP6, 40000), (TARGET6, 9), code)
    raw = one_packet(stack)
    assert len(raw) == 40 + 8 + 40 + 8
    pkt = IPv6(raw)
    assert (pkt.src, pkt.dst, pkt.nh, pkt.plen) == (TARGET6, APP6, 58, 56)
    err = pkt[ICMPv6DestUnreach]
    assert (err.type, err.code) == (1, icmp_code)
    quoted = raw[48:]
    inner = IPv6(quoted[:40])
    assert (inner.src, inner.dst, inner.nh, inner.plen, inner.hlim) == (APP6, TARGET6, 17, 8, 64)
    assert struct.unpack("!HHH", quoted[40:46]) == (40000, 9, 8)


def test_echo_prohibited_v4_quotes_the_echo_request(stack):
    """What ping shows as "Packet filtered": the quoted request carries the app's identifier and seq."""
    stack.icmp_unreachable(TARGET4, (APP4, 0x4242), (TARGET4, 3), UNREACH_PROHIBITED, echo=True)
    pkt = IP(one_packet(stack))
    assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 13)
    raw = bytes(pkt)
    inner = IP(raw[28:48])
    assert (inner.src, inner.dst, inner.proto) == (APP4, TARGET4, 1)
    assert raw[48:50] == b"\x08\x00" and raw[52:56] == b"\x42\x42\x00\x03"
    assert folded_sum(raw[48:56]) == 0xFFFF  # the quoted echo header is a valid one


def test_echo_prohibited_v6_quotes_the_echo_request(stack):
    stack.icmp_unreachable(TARGET6, (APP6, 0x4242), (TARGET6, 3), UNREACH_PROHIBITED, echo=True)
    pkt = IPv6(one_packet(stack))
    err = pkt[ICMPv6DestUnreach]
    assert (err.type, err.code) == (1, 1)
    raw = bytes(pkt)
    inner = IPv6(raw[48:88])
    assert (inner.src, inner.dst, inner.nh) == (APP6, TARGET6, 58)
    assert raw[88:90] == b"\x80\x00" and raw[92:96] == b"\x42\x42\x00\x03"


def test_caller_mistakes_raise(stack):
    with pytest.raises(LocalProtocolError):
        stack.icmp_unreachable(TARGET4, (APP6, 1), (TARGET4, 2), UNREACH_PORT)
    with pytest.raises(LocalProtocolError):
        stack.icmp_unreachable(TARGET6, (APP4, 1), (TARGET4, 2), UNREACH_PORT)
    with pytest.raises(LocalProtocolError):
        stack.icmp_unreachable(TARGET4, (APP4, 1), (TARGET4, 2), 9)
    with pytest.raises(LocalProtocolError):
        stack.icmp_echo_reply(TARGET4, APP4, 1, 1, bytes(9000))  # larger than the MTU
    assert stack.packets_to_send() == []
