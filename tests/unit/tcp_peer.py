"""A scripted TCP endpoint made of scapy packets: the "app" side of a netstack under test.

It keeps just enough TCP state (sequence numbers, received bytes, flags seen) to drive a ``Stack`` through
handshakes, data, half-close and resets, and to check every packet the stack sends back.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from netstack import Stack, TcpConnectRequest, TcpFlow


def ip_layer(src: str, dst: str) -> Packet:
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def checksums_ok(raw: bytes) -> bool:
    """True when scapy, recomputing every checksum, rebuilds exactly the bytes the stack sent."""
    pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
    if pkt.version == 4:
        del pkt.chksum
    for layer in (TCP, UDP):
        if pkt.haslayer(layer):
            del pkt[layer].chksum
    return bytes(pkt) == raw


@dataclass
class TcpPeer:
    stack: Stack
    src: str
    dst: str
    sport: int = field(default_factory=lambda: random.randint(20000, 60000))
    dport: int = 80
    window: int = 65535
    mss: int = 1460
    seq: int = field(default_factory=lambda: random.randint(0, 2**32 - 1))
    ack: int = 0
    received: bytearray = field(default_factory=bytearray)
    got_fin: bool = False
    got_rst: bool = False
    got_synack: bool = False
    auto_ack: bool = True

    def _pkt(
        self, flags: str, payload: bytes = b"", seq: int | None = None, window: int | None = None
    ) -> bytes:
        tcp = TCP(
            sport=self.sport,
            dport=self.dport,
            flags=flags,
            seq=self.seq if seq is None else seq,
            ack=self.ack if "A" in flags else 0,
            window=self.window if window is None else window,
        )
        if "S" in flags:
            tcp.options = [("MSS", self.mss), ("WScale", 0)]
        pkt = ip_layer(self.src, self.dst) / tcp
        if payload:
            pkt = pkt / Raw(payload)
        return bytes(pkt)

    def syn(self) -> None:
        self.stack.receive_packet(self._pkt("S"))

    def handle(self, raw: bytes) -> bool:
        """Take one packet the stack sent; False when it is not for this connection."""
        assert checksums_ok(raw), "the stack sent a packet with a bad checksum"
        pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
        tcp = pkt.getlayer(TCP)
        if tcp is None or tcp.dport != self.sport or tcp.sport != self.dport:
            return False
        flags = str(tcp.flags)
        if "R" in flags:
            self.got_rst = True
            return True
        if "S" in flags and "A" in flags:
            self.got_synack = True
            self.seq += 1
            self.ack = (tcp.seq + 1) % 2**32
            self.stack.receive_packet(self._pkt("A"))
            return True
        payload = bytes(tcp.payload)
        if payload and tcp.seq == self.ack:
            self.received += payload
            self.ack = (self.ack + len(payload)) % 2**32
        if "F" in flags and tcp.seq + len(payload) == self.ack:
            self.got_fin = True
            self.ack = (self.ack + 1) % 2**32
        if (payload or "F" in flags) and self.auto_ack:
            self.stack.receive_packet(self._pkt("A"))
        return True

    def send(self, data: bytes, segment: int = 1400, push: bool = True) -> None:
        """Send `data` in segments; PSH marks the last one unless `push` is False (a write not yet ended)."""
        for i in range(0, len(data), segment):
            chunk = data[i : i + segment]
            last = i + segment >= len(data)
            self.stack.receive_packet(self._pkt("PA" if push and last else "A", chunk))
            self.seq = (self.seq + len(chunk)) % 2**32

    def fin(self) -> None:
        self.stack.receive_packet(self._pkt("FA"))
        self.seq = (self.seq + 1) % 2**32

    def rst(self) -> None:
        self.stack.receive_packet(self._pkt("R", seq=self.seq))

    def ack_now(self, window: int | None = None) -> None:
        self.stack.receive_packet(self._pkt("A", window=window))


def deliver(stack: Stack, peers: list[TcpPeer], rounds: int = 50) -> list[bytes]:
    """Shuttle the stack's output to the peers until quiet; returns packets no peer claimed."""
    unclaimed: list[bytes] = []
    for _ in range(rounds):
        out = stack.packets_to_send()
        if not out:
            break
        for raw in out:
            if not any(p.handle(raw) for p in peers):
                unclaimed.append(raw)
    return unclaimed


def connect(stack: Stack, peer: TcpPeer, accept: bool = True) -> TcpFlow:
    """The app's SYN from `peer`; its flow, accepted (handshake completed) unless `accept` is False."""
    peer.syn()
    events = stack.events()
    assert len(events) == 1 and isinstance(events[0], TcpConnectRequest)
    flow = events[0].flow
    if accept:
        flow.accept()
        deliver(stack, [peer])
        assert peer.got_synack
    return flow


class Wire:
    """The app's end of a socketpair that stands in for the TUN device: a TcpPeer's packets go in (it is the
    peer's "stack"), the stack's packets come out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive_packet(self, raw: bytes) -> None:
        self.sock.send(raw)

    def packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(70000))
            except BlockingIOError:
                return out
