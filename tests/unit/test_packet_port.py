"""netstack's packet-port seam: `TunStack` behaves the same over a TUN fd (FdPort, a socketpair standing in
for the device) and over a port that hands packets in and out as Python batches (the shape of the Wintun
port). The app side is scripted with scapy packets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import IP, UDP

from netstack import Stack, StackConfig, TcpFlow, UdpDatagram
from netstack.aio import PUMP_BATCH, TunStack
from netstack.port import FdPort, PacketPort
from tests.unit.tcp_peer import TcpPeer


class QueuePort:
    """An fd-less port: packets arrive as Python batches, leave through `write_batch` (like Wintun's)."""

    def __init__(self) -> None:
        self.incoming: list[bytes] = []
        self.sent: list[bytes] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_readable: Callable[[], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None
        self.stopped = 0
        self.reads: list[int] = []

    def start(
        self,
        stack: Stack,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.loop, self.on_readable, self.on_error = loop, on_readable, on_error

    def read_batch(self, stack: Stack, max_packets: int) -> int:
        batch, self.incoming = self.incoming[:max_packets], self.incoming[max_packets:]
        for packet in batch:
            stack.receive_packet(packet)
        self.reads.append(len(batch))
        return len(batch)

    def write_batch(self, stack: Stack) -> None:
        self.sent += stack.packets_to_send()

    def stop(self) -> None:
        self.stopped += 1
        self.on_readable = None

    # -- the app's side
    def receive_packet(self, raw: bytes) -> None:
        self.incoming.append(raw)
        if self.on_readable is not None:
            assert self.loop is not None
            self.loop.call_soon(self.on_readable)  # the readiness hook, as a reader thread would post it

    def packets(self) -> list[bytes]:
        out, self.sent = self.sent, []
        return out


class FdWire:
    """The app's end of a socketpair that stands in for a TUN fd."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.theirs.setblocking(False)

    def port(self) -> FdPort:
        return FdPort(self.ours.fileno())

    def receive_packet(self, raw: bytes) -> None:
        self.theirs.send(raw)

    def packets(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.theirs.recv(70000))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


Wire = FdWire | QueuePort


@pytest.fixture(params=["fd", "queue"])
def wire(request: pytest.FixtureRequest) -> Iterator[tuple[Wire, int | PacketPort]]:
    if request.param == "fd":
        fd_wire = FdWire()
        yield fd_wire, fd_wire.ours.fileno()  # an int: TunStack wraps it in an FdPort, as callers do today
        fd_wire.close()
    else:
        queue = QueuePort()
        yield queue, queue


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> None:
        self.transport.write_eof()


async def shuttle(wire: Wire, peers: list[TcpPeer], rounds: int = 20) -> list[bytes]:
    """Let the loop run and hand every packet to its peer; returns the packets no peer claimed."""
    unclaimed = []
    for _ in range(rounds):
        await asyncio.sleep(0.001)
        for raw in wire.packets():
            if not any(peer.handle(raw) for peer in peers):
                unclaimed.append(raw)
    return unclaimed


def test_tcp_echo_with_half_close_over_either_port(wire: tuple[Wire, int | PacketPort]) -> None:
    async def main() -> None:
        app, port = wire
        tun = TunStack(port, on_tcp=lambda flow: tun.accept(flow, Echo))
        tun.start()
        try:
            peer = TcpPeer(app, "198.18.0.2", "198.19.0.9", sport=40001)  # type: ignore[arg-type]
            peer.syn()
            await shuttle(app, [peer])
            assert peer.got_synack
            peer.send(b"hello through the port" * 100)
            peer.fin()
            await shuttle(app, [peer])
            assert bytes(peer.received) == b"hello through the port" * 100
            assert peer.got_fin and not peer.got_rst
        finally:
            tun.close()

    asyncio.run(main())


def test_udp_both_ways_over_either_port(wire: tuple[Wire, int | PacketPort]) -> None:
    async def main() -> None:
        app, port = wire
        got: list[UdpDatagram] = []
        tun = TunStack(port, on_udp=got.append)
        tun.start()
        try:
            app.receive_packet(
                bytes(IP(src="198.18.0.2", dst="198.19.0.53") / UDP(sport=5353, dport=53) / b"q")
            )
            await shuttle(app, [])
            assert [(d.src, d.dst, d.payload) for d in got] == [
                (("198.18.0.2", 5353), ("198.19.0.53", 53), b"q")
            ]
            # A reply leaves at once, outside any batch of work (the port is written right away).
            tun.udp_send(("198.19.0.53", 53), ("198.18.0.2", 5353), b"answer")
            out = [IP(raw) for raw in app.packets()]
            assert len(out) == 1 and out[0][UDP].load == b"answer" and out[0][UDP].dport == 5353
        finally:
            tun.close()

    asyncio.run(main())


def test_closing_resets_the_apps_connections_over_either_port(wire: tuple[Wire, int | PacketPort]) -> None:
    async def main() -> None:
        app, port = wire
        flows: list[TcpFlow] = []

        def on_tcp(flow: TcpFlow) -> None:
            flows.append(flow)
            tun.accept(flow, asyncio.Protocol)

        tun = TunStack(port, on_tcp=on_tcp)
        tun.start()
        peer = TcpPeer(app, "198.18.0.2", "198.19.0.9", sport=40002)  # type: ignore[arg-type]
        peer.syn()
        await shuttle(app, [peer])
        assert peer.got_synack and len(flows) == 1
        tun.close()
        for raw in app.packets():
            peer.handle(raw)
        assert peer.got_rst, "the app learns at once that its connection is gone"

    asyncio.run(main())


def test_a_large_burst_is_read_in_bounded_batches() -> None:
    async def main() -> None:
        port = QueuePort()
        got: list[UdpDatagram] = []
        tun = TunStack(port, on_udp=got.append)
        tun.start()
        try:
            packet = bytes(IP(src="198.18.0.2", dst="198.19.0.53") / UDP(sport=1, dport=9) / b"x")
            for _ in range(PUMP_BATCH * 3 + 5):
                port.receive_packet(packet)
            await asyncio.sleep(0.01)
            assert len(got) == PUMP_BATCH * 3 + 5
            assert max(port.reads) == PUMP_BATCH
        finally:
            tun.close()

    asyncio.run(main())


def test_a_port_failure_off_the_loop_stops_reading_and_nothing_is_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        port = QueuePort()
        tun = TunStack(port, config=StackConfig())
        tun.start()
        assert port.on_error is not None
        port.on_error(OSError(38, "Reached the end of the file"))  # a Wintun session that ended
        assert port.stopped == 1
        tun.close()
        assert port.stopped == 1, "stopped once, not again at close"

    asyncio.run(main())
    assert "no longer reading" in caplog.text


def test_a_read_error_on_the_fd_stops_reading(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        gone = socket.socket()  # never connected: the loop sees it hang up, a read fails with ENOTCONN
        gone.setblocking(False)
        tun = TunStack(gone.fileno())
        tun.start()
        await asyncio.sleep(0.02)
        assert not tun._started, "it stopped reading instead of spinning on the error"
        tun.close()
        gone.close()

    asyncio.run(main())
    assert "no longer reading" in caplog.text


class Pausing(asyncio.Protocol):
    """Records what arrives and pauses reading after every chunk; the test resumes it by hand."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.transport.pause_reading()

    def eof_received(self) -> None:
        self.eof += 1


def test_bytes_and_eof_arrive_once_and_in_order_across_pauses(wire: tuple[Wire, int | PacketPort]) -> None:
    async def main() -> None:
        app, port = wire
        protocols: list[Pausing] = []

        def accept(flow: TcpFlow) -> None:
            protocols.append(Pausing())
            tun.accept(flow, lambda: protocols[-1])

        tun = TunStack(port, on_tcp=accept)
        tun.start()
        try:
            peer = TcpPeer(app, "198.18.0.2", "198.19.0.9", sport=40003)  # type: ignore[arg-type]
            peer.syn()
            await shuttle(app, [peer])
            (proto,) = protocols
            sent = b""
            for i in range(3):
                part = bytes([65 + i]) * 700
                sent += part
                peer.send(part)
                await shuttle(app, [peer], rounds=3)
            peer.fin()
            await shuttle(app, [peer], rounds=3)
            assert proto.eof == 0  # reading is paused: the EOF waits behind it
            for _ in range(10):
                proto.transport.resume_reading()
                await shuttle(app, [peer], rounds=2)
            assert b"".join(proto.chunks) == sent
            assert proto.eof == 1
        finally:
            tun.close()

    asyncio.run(main())
