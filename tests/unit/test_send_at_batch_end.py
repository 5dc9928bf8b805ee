"""An upstream send made while the netstack delivers a batch leaves at the end of that batch, not a loop
turn later: `TunStack.defer` with `x2ssh.ssh.tuning.flush_sends_with` (netstack.aio on a socketpair standing
in for the TUN device, the app's side played by TcpPeer)."""

from __future__ import annotations

import asyncio
import socket

from scapy.layers.inet import IP, TCP

from netstack import StackConfig, TcpFlow
from netstack.aio import TunStack
from tests.unit.tcp_peer import TcpPeer, Wire
from tests.unit.test_netstack_aio_turns import Recorder, exchange
from x2ssh.ssh import tuning


class Upstream:
    """The part of an asyncssh connection `coalesce_sends` wraps: each flushed write is recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def _send(self, data: bytes) -> None:
        self.writes.append(data)


async def _forwarding(ours: socket.socket, wire: Wire, upstream: Upstream) -> tuple[TunStack, TcpPeer, list]:
    """A stack whose one accepted flow sends what the app sends to `upstream`; `seen` records, at the
    start of the loop's next turn after each delivery, what had reached `upstream` by then."""
    loop = asyncio.get_running_loop()
    seen: list[list[bytes]] = []
    protocol = Recorder()

    def on_data() -> None:
        loop.call_soon(lambda: seen.append(list(upstream.writes)))  # queued before the sends below
        upstream._send(b"header ")  # two packets from one delivery: still one write
        upstream._send(bytes(protocol.data))
        protocol.data.clear()

    protocol.on_data = on_data

    def on_tcp(flow: TcpFlow) -> None:
        tun.accept(flow, lambda: protocol)

    tun = TunStack(ours.fileno(), config=StackConfig(mtu=16000), on_tcp=on_tcp)
    tun.start()
    tuning.coalesce_sends(upstream)
    tuning.flush_sends_with(upstream, tun.defer)
    peer = TcpPeer(wire, "198.18.0.2", "198.19.0.2", mss=8000)  # type: ignore[arg-type]
    peer.syn()
    await exchange(wire, peer)
    assert peer.got_synack
    return tun, peer, seen


def test_a_send_during_a_batch_leaves_before_the_loops_next_turn(wired):
    async def run() -> None:
        upstream = Upstream()
        tun, peer, seen = await _forwarding(*wired, upstream)
        try:
            peer.send(b"request 1")
            await exchange(wired[1], peer)
            peer.send(b"request 2")
            await exchange(wired[1], peer)
            first, second = b"header request 1", b"header request 2"
            assert seen == [[first], [first, second]], "sent a turn after its batch"
        finally:
            tun.close()

    asyncio.run(run())


def test_defer_outside_a_batch_runs_on_the_next_turn(wired):
    async def run() -> None:
        tun = TunStack(wired[0].fileno())
        ran: list[str] = []
        try:
            tun.defer(lambda: ran.append("deferred"))
            assert ran == []
            await asyncio.sleep(0)
            assert ran == ["deferred"]
        finally:
            tun.close()

    asyncio.run(run())


def test_a_failing_deferred_callback_is_logged_and_the_others_still_run(wired, caplog):
    async def run() -> None:
        upstream = Upstream()
        tun, peer, _ = await _forwarding(*wired, upstream)

        def fail() -> None:
            raise RuntimeError("deferred failure")

        original = tun._dispatch

        def dispatch() -> None:
            tun._dispatching = True
            tun.defer(fail)
            tun._dispatching = False
            original()

        tun._dispatch = dispatch  # type: ignore[method-assign]
        try:
            peer.send(b"request")
            await exchange(wired[1], peer)
            assert upstream.writes == [b"header request"]
            assert "deferred failure" in caplog.text
        finally:
            tun.close()

    asyncio.run(run())


def test_the_upstream_send_goes_before_the_stacks_own_output_of_the_batch(wired):
    """The request's way upstream is the critical path: it leaves before the segments the stack sends for
    the same batch (here an answer the protocol wrote back to the app at once)."""

    async def run() -> None:
        ours, wire = wired
        on_wire_at_flush: list[list[bytes]] = []

        class Watching(Upstream):
            def _send(self, data: bytes) -> None:
                segments = [bytes(IP(raw)[TCP].payload) for raw in wire.packets()]
                on_wire_at_flush.append([s for s in segments if s])
                super()._send(data)

        upstream = Watching()
        tun, peer, _ = await _forwarding(ours, wire, upstream)
        protocol = next(iter(tun.transports.values())).get_protocol()
        forward = protocol.on_data  # type: ignore[attr-defined]

        def answer_then_forward() -> None:
            protocol.transport.write(b"answer")  # type: ignore[attr-defined]
            forward()

        protocol.on_data = answer_then_forward  # type: ignore[attr-defined]
        try:
            peer.send(b"request")
            await exchange(wire, peer)
            assert upstream.writes == [b"header request"]
            assert on_wire_at_flush == [[]], "the stack's output of the batch left before the upstream send"
            assert bytes(peer.received) == b"answer"
        finally:
            tun.close()

    asyncio.run(run())
