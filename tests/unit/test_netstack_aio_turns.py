"""Loop turns on the netstack's side of a request/response (netstack.aio on a socketpair standing in for the
TUN device): an interactive answer leaves at once, a one-request connection's answer and FIN share a
segment, the bare ACK for a request leaves after the request's own way upstream, at the end of the same batch
(for a new connection's first request, when its answer carries the ACK, or after ack_hold), and a batch
schedules no extra turn for itself."""

from __future__ import annotations

import asyncio
import socket

from scapy.layers.inet import IP, TCP

from netstack import StackConfig, TcpFlow
from netstack.aio import TunStack
from tests.unit.tcp_peer import TcpPeer, Wire


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.on_data = lambda: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.on_data()


async def exchange(wire: Wire, peer: TcpPeer, rounds: int = 5) -> list[bytes]:
    """Let the loop run and hand the stack's packets to the peer; returns them."""
    seen = []
    for _ in range(rounds):
        await asyncio.sleep(0.001)
        for raw in wire.packets():
            seen.append(raw)
            peer.handle(raw)
    return seen


async def _connected(
    ours: socket.socket,
    wire: Wire,
    ack_hold: float = StackConfig.ack_hold,
    protocol: type[Recorder] = Recorder,
) -> tuple[TunStack, TcpPeer, Recorder]:
    protocols: list[Recorder] = []

    def on_tcp(flow: TcpFlow) -> None:
        protocols.append(protocol())
        tun.accept(flow, lambda: protocols[-1])

    tun = TunStack(ours.fileno(), config=StackConfig(mtu=16000, ack_hold=ack_hold), on_tcp=on_tcp)
    tun.start()
    peer = TcpPeer(wire, "198.18.0.2", "198.19.0.2", mss=8000)  # type: ignore[arg-type]
    peer.syn()
    await exchange(wire, peer)
    assert peer.got_synack and len(protocols) == 1
    return tun, peer, protocols[0]


def test_an_interactive_answer_leaves_before_the_turn_ends(wired):
    async def run() -> None:
        tun, peer, proto = await _connected(*wired)
        wire = wired[1]
        try:
            for n in range(3):
                peer.send(b"request %d" % n)
                await exchange(wire, peer)
                proto.transport.write(b"answer %d" % n)  # from upstream: outside the stack's batch
                already = wire.packets()  # before the loop gets another turn
                if n == 0:
                    assert already == [], "a flow's first answer waits for the end of the turn"
                else:
                    (raw,) = already
                    assert bytes(IP(raw)[TCP].payload) == b"answer %d" % n
                for raw in already:
                    peer.handle(raw)
                await exchange(wire, peer)
            assert bytes(peer.received) == b"answer 0answer 1answer 2"
        finally:
            tun.close()

    asyncio.run(run())


def test_a_first_answer_and_its_fin_share_one_segment(wired):
    async def run() -> None:
        tun, peer, proto = await _connected(*wired)
        wire = wired[1]
        try:
            peer.send(b"GET / HTTP/1.0\r\n\r\n")
            await exchange(wire, peer)
            proto.transport.write(b"HTTP/1.0 200 OK\r\n\r\nbody")
            proto.transport.write_eof()
            segments = [IP(raw)[TCP] for raw in await exchange(wire, peer)]
            with_data = [seg for seg in segments if bytes(seg.payload)]
            assert len(with_data) == 1 and "F" in str(with_data[0].flags)
            assert peer.got_fin and bytes(peer.received).endswith(b"body")
        finally:
            tun.close()

    asyncio.run(run())


def test_the_bare_ack_follows_the_requests_way_upstream_in_the_same_turn(wired):
    """The consumer's upstream send runs at the end of the batch (`defer`, as the SSH side's coalesced send
    does); the ACK for the request is written after it, and before the loop's next turn: no turn of its
    own. (The flow's second request: the first one's ACK is held, see below.)"""

    async def run() -> None:
        tun, peer, proto = await _connected(*wired, ack_hold=0.001)
        wire = wired[1]
        loop = asyncio.get_running_loop()
        order: list[str] = []
        peer.send(b"first request", push=True)
        await exchange(wire, peer, rounds=20)

        early: list[bytes] = []  # what the stack wrote before the loop let `exchange` see it

        def acked() -> bool:
            early.extend(wire.packets())
            return any(IP(raw)[TCP].ack == peer.seq for raw in early)

        def upstream_send() -> None:
            order.append("ack" if acked() else "upstream")
            loop.call_soon(lambda: order.append("ack" if acked() else "no ack yet"))

        proto.on_data = lambda: tun.defer(upstream_send)
        try:
            peer.auto_ack = False
            peer.send(b"request", push=True)
            later = await exchange(wire, peer)
            for raw in early:
                peer.handle(raw)
            segments = [IP(raw)[TCP] for raw in early + later]
            assert order == ["upstream", "ack"], (
                "the bare ACK went before the request's send upstream, or a turn late"
            )
            assert [seg.ack for seg in segments] == [peer.seq], "then exactly one ACK"
        finally:
            tun.close()

    asyncio.run(run())


def test_a_batch_schedules_no_extra_turn_for_itself(wired):
    async def run() -> None:
        tun, peer, proto = await _connected(*wired)
        wire = wired[1]
        extra: list[int] = []
        original = tun._after_ops
        tun._after_ops = lambda: (extra.append(1), original())  # type: ignore[method-assign]
        try:
            peer.send(b"request")
            await exchange(wire, peer)
            assert bytes(proto.data) == b"request"
            assert extra == [], "delivering a batch scheduled another turn of the loop"
        finally:
            tun.close()

    asyncio.run(run())


def test_a_new_connections_request_is_acknowledged_by_its_answer(wired):
    """The answer comes a few milliseconds after the request (its way through SSH): no bare ACK goes
    before it; the answer carries the ACK."""

    async def run() -> None:
        tun, peer, proto = await _connected(*wired, ack_hold=0.2)
        wire = wired[1]
        loop = asyncio.get_running_loop()
        proto.on_data = lambda: loop.call_later(0.003, proto.transport.write, b"answer")
        try:
            peer.auto_ack = False
            peer.send(b"request", push=True)
            segments = [IP(raw)[TCP] for raw in await exchange(wire, peer, rounds=20)]
            assert [(bytes(seg.payload), seg.ack) for seg in segments] == [(b"answer", peer.seq)]
        finally:
            tun.close()

    asyncio.run(run())


def test_an_unanswered_first_request_is_acknowledged_after_ack_hold(wired):
    """No answer comes (an app with Nagle on waits for our ACK before it sends the rest): one bare ACK
    after ack_hold; the flow's next request is acknowledged without waiting for its answer."""

    async def run() -> None:
        tun, peer, proto = await _connected(*wired, ack_hold=0.002)
        wire = wired[1]
        try:
            peer.auto_ack = False
            peer.send(b"GET / HTTP/1.1\r\n", push=True)
            segments = [IP(raw)[TCP] for raw in await exchange(wire, peer, rounds=20)]
            assert [(bytes(seg.payload), seg.ack) for seg in segments] == [(b"", peer.seq)]
            tun.stack.config.__dict__["ack_hold"] = 3600.0  # (frozen dataclass) only the first ACK may wait
            peer.send(b"\r\n", push=True)
            segments = [IP(raw)[TCP] for raw in await exchange(wire, peer, rounds=3)]
            assert [(bytes(seg.payload), seg.ack) for seg in segments] == [(b"", peer.seq)]
            assert bytes(proto.data) == b"GET / HTTP/1.1\r\n\r\n"
        finally:
            tun.close()

    asyncio.run(run())


def test_by_default_a_first_request_is_acknowledged_without_a_hold(wired):
    """StackConfig's default holds no ACK: over a real network no answer comes within any sensible hold,
    so an app with Nagle on would only wait longer. The bare ACK leaves at the end of the batch."""

    async def run() -> None:
        tun, peer, _proto = await _connected(*wired)
        wire = wired[1]
        try:
            peer.auto_ack = False
            peer.send(b"GET / HTTP/1.1\r\n", push=True)
            segments = [IP(raw)[TCP] for raw in await exchange(wire, peer, rounds=3)]  # (3 ms)
            assert [(bytes(seg.payload), seg.ack) for seg in segments] == [(b"", peer.seq)]
        finally:
            tun.close()

    asyncio.run(run())
