"""Bounded memory under any load: the cap on channel opens in flight (TcpBridge, against a fake SSH
connection: orchestration logic) and the global buffer budget (netstack.aio over a socketpair standing in
for the TUN device, with scapy-made packets from a scripted app)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import asyncssh
import pytest
from scapy.layers.inet import IP, TCP

from netstack import StackConfig, TcpFlow
from netstack.aio import TunStack
from tests.unit.tcp_peer import TcpPeer, Wire
from x2ssh.flows.tcp_bridge import BridgeLimits, TcpBridge

# -- the cap on channel opens ------------------------------------------------------------------------------


class FakeFlow:
    """The part of a netstack flow the bridge uses while the SYN is held."""

    def __init__(self, port: int) -> None:
        self.id = port
        self.src = ("198.18.0.2", 40000 + port % 20000)
        self.dst = ("198.19.0.2", port)
        self.closed = False
        self.refused = False

    def refuse(self) -> None:
        self.refused = True
        self.closed = True


class FakeChannel:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close


class FakeConnection:
    """Channel opens that stay in flight until the test answers them."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, asyncio.Future[Any]]] = []
        self.in_flight = 0
        self.peak = 0

    async def create_connection(self, factory: Any, host: str, port: int, *args: Any, **kw: Any) -> Any:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        future = asyncio.get_running_loop().create_future()
        self.pending.append((port, future))
        try:
            return await future
        finally:
            self.in_flight -= 1

    def answer_all(self, open_ports: set[int]) -> int:
        answered, self.pending = self.pending, []
        for port, future in answered:
            if future.done():  # given up by the bridge
                continue
            if port in open_ports:
                future.set_result((FakeChannel(), None))
            else:
                future.set_exception(asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "refused"))
        return len(answered)


class FakeCallbackConnection(FakeConnection):
    """The same, opened by callback (the shape of ConnectionPool.open_tcp_channel)."""

    def open_tcp_channel(self, factory: Any, host: str, port: int, *args: Any, **kw: Any) -> Any:
        on_done = args[2]
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        future = asyncio.get_running_loop().create_future()

        def settle(f: asyncio.Future[Any]) -> None:
            self.in_flight -= 1
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                on_done(f.result()[0], None)
            else:
                on_done(None, exc)

        future.add_done_callback(settle)
        self.pending.append((port, future))
        return future  # cancel() is all the bridge calls on it


CONNECTIONS = pytest.mark.parametrize("make_conn", [FakeConnection, FakeCallbackConnection])


class FakeTun:
    def __init__(self) -> None:
        self.accepted: list[Any] = []

    def accept(self, flow: Any, factory: Any) -> Any:
        self.accepted.append(flow)
        return _FakeTransport()


class _FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@CONNECTIONS
def test_a_port_scan_holds_a_bounded_number_of_opens_and_ordinary_flows_get_through(make_conn: Any):
    asyncio.run(_port_scan(make_conn()))


async def _port_scan(conn: FakeConnection) -> None:
    tun = FakeTun()
    bridge = TcpBridge(lambda: tun, limits=BridgeLimits(max_opening=8, max_waiting=100))  # type: ignore[arg-type]
    bridge.set_connection(conn)  # type: ignore[arg-type]
    scan = [FakeFlow(20000 + i) for i in range(1000)]
    for flow in scan[:50]:
        bridge.on_tcp(flow)  # type: ignore[arg-type]
    web = FakeFlow(443)
    bridge.on_tcp(web)  # type: ignore[arg-type]
    for flow in scan[50:]:
        bridge.on_tcp(flow)  # type: ignore[arg-type]
    await settle()
    assert conn.in_flight == 8 and bridge.stats.opening == 8
    assert bridge.stats.waiting == 100
    over = [f for f in scan if f.refused]
    assert len(over) == 1000 + 1 - 8 - 100 and bridge.stats.over_limit == len(over)
    assert not web.refused, "a flow that found room in the queue waits, it is not refused"
    for _ in range(200):  # the server refuses every closed port; the queue drains in order
        if not conn.answer_all({443}):
            break
        await settle()
    assert conn.peak == 8
    assert tun.accepted == [web]
    assert all(f.refused for f in scan)
    assert bridge.stats.refused == 8 + 100 - 1 and bridge.stats.opened == 1
    assert bridge.stats.opening == 0 and bridge.stats.waiting == 0


@CONNECTIONS
def test_closing_the_bridge_refuses_the_waiting_syns(make_conn: Any):
    asyncio.run(_close_with_waiting(make_conn()))


async def _close_with_waiting(conn: FakeConnection) -> None:
    bridge = TcpBridge(FakeTun, limits=BridgeLimits(max_opening=1, max_waiting=10))  # type: ignore[arg-type]
    bridge.set_connection(conn)  # type: ignore[arg-type]
    flows = [FakeFlow(1000 + i) for i in range(5)]
    for flow in flows:
        bridge.on_tcp(flow)  # type: ignore[arg-type]
    await settle()
    bridge.close()
    await settle()
    assert all(f.refused for f in flows[1:]), "the SYNs still waiting for an open slot get a RST"
    assert bridge.stats.opening == 0 and bridge.stats.waiting == 0 and conn.in_flight == 0


@CONNECTIONS
def test_an_open_that_never_completes_is_refused_after_the_timeout(make_conn: Any):
    asyncio.run(_open_timeout(make_conn()))


async def _open_timeout(conn: FakeConnection) -> None:
    bridge = TcpBridge(FakeTun, limits=BridgeLimits(open_timeout=0.05))  # type: ignore[arg-type]
    bridge.set_connection(conn)  # type: ignore[arg-type]
    silent = FakeFlow(25)
    bridge.on_tcp(silent)  # type: ignore[arg-type]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if silent.refused:
            break
    assert silent.refused and bridge.stats.failed == 1
    assert bridge.stats.opening == 0 and conn.in_flight == 0


def test_limits_are_validated():
    with pytest.raises(ValueError):
        BridgeLimits(max_opening=0)


# -- the global buffer budget ------------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.data = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


async def exchange(wire: Wire, peers: list[TcpPeer], rounds: int = 20) -> list[int]:
    """Let the loop run and hand every packet to its peer; returns the windows advertised to the apps."""
    windows = []
    for _ in range(rounds):
        await asyncio.sleep(0.001)
        for raw in wire.packets():
            windows.append(IP(raw)[TCP].window)
            for peer in peers:
                if peer.handle(raw):
                    break
    return windows


def test_past_the_budget_every_flow_stops_reading_and_nothing_is_dropped(wired):
    asyncio.run(_budget(*wired))


async def _budget(ours: socket.socket, wire: Wire) -> None:
    protocols: list[Recorder] = []

    def on_tcp(flow: TcpFlow) -> None:
        protocols.append(Recorder())
        tun.accept(flow, lambda: protocols[-1])

    tun = TunStack(ours.fileno(), config=StackConfig(mtu=16000, buffer_budget=300_000), on_tcp=on_tcp)
    tun.start()
    try:
        slow = TcpPeer(wire, "198.18.0.2", "198.19.0.2", sport=41000, mss=8000)  # type: ignore[arg-type]
        uploader = TcpPeer(wire, "198.18.0.2", "198.19.0.3", sport=41001, mss=8000)  # type: ignore[arg-type]
        slow.syn()
        uploader.syn()
        await exchange(wire, [slow, uploader])
        assert len(protocols) == 2 and slow.got_synack and uploader.got_synack
        to_slow, to_uploader = protocols
        slow.auto_ack = False  # an app that does not read: what we send it stays buffered
        download = os.urandom(400_000)
        to_slow.transport.write(download)  # type: ignore[attr-defined]
        await exchange(wire, [slow, uploader])
        assert tun.over_budget and tun.buffered_bytes() > 300_000
        assert to_slow.events == ["pause"] and to_uploader.events == ["pause"], "every flow stops reading"

        # The uploader's bytes are still read and handed on, but its window is not reopened.
        full_window = 1024 * 1024  # TCP_WND
        uploader.send(os.urandom(60_000), segment=8000)
        windows = await exchange(wire, [slow, uploader])
        assert len(to_uploader.data) == 60_000
        assert windows and windows[-1] * 128 <= 1024 * 1024 - 59_000  # (scaled by 128) it stays shrunk

        # The slow app reads at last: memory drains, both flows resume, the window reopens.
        for _ in range(50):
            slow.ack_now()
            await exchange(wire, [slow, uploader], rounds=2)
            if not tun.over_budget and len(slow.received) == len(download):
                break
        assert bytes(slow.received) == download, "nothing dropped"
        assert to_slow.events == ["pause", "resume"] and to_uploader.events == ["pause", "resume"]
        uploader.send(b"x")
        windows = await exchange(wire, [slow, uploader])
        assert windows and windows[-1] * 128 >= full_window - 1_000
        assert tun.budget_pauses == 1
    finally:
        tun.close()
