"""`x2ssh --vpn -D`: the proxy port beside the TUN on the VPN's own session (no SSH here: the session is not
connected, the host and the TUN stack are fakes). What is checked is the wiring: a taken port fails before
the TUN is asked for; the session's attach/detach reach the proxy as they reach the TCP bridge; UDP replies
from the agent go to the proxy's association they belong to and everything else into the TUN; the proxy's
clients count in the status; teardown closes the port. The end-to-end run is
tests/integration/test_vpn_proxy_netns.py."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from typing import Any

import pytest

from x2ssh.frontends import proxy as proxy_module
from x2ssh.frontends import vpn
from x2ssh.frontends.proxy import ProxyListenFailed
from x2ssh.settings import parse_args
from x2ssh.status_report import check_status

TARGET = ("198.18.0.9", 7)


class FakeHost:
    """Only what VpnSession's construction, the start of _bring_up and _tear_down ask of the host."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def marked_socket(self, *args: Any) -> socket.socket:
        raise AssertionError("no connection is made here")

    async def open_tun(self) -> Any:
        self.calls.append("open_tun")
        raise RuntimeError("no TUN in this test")

    def down(self) -> list[str]:
        self.calls.append("down")
        return []


class FakeTunStack:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def udp_send(self, src: Any, dst: Any, payload: bytes) -> None:
        self.sent.append((src, dst, payload))

    def close(self) -> None:
        pass


def session(port: int = 0) -> tuple[vpn.VpnSession, FakeHost]:
    settings = dataclasses.replace(parse_args(["--vpn", "-D", "1080", "host"]), dynamic=("127.0.0.1", port))
    host = FakeHost()
    return vpn.VpnSession(settings, host), host  # type: ignore[arg-type]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_no_proxy_without_dynamic() -> None:
    async def go() -> None:
        plain = vpn.VpnSession(parse_args(["--vpn", "host"]), FakeHost())  # type: ignore[arg-type]
        assert plain.proxy is None
        assert plain.status_document()["proxy"] is None

    run(go())


def test_a_taken_port_fails_before_the_tun_is_asked_for() -> None:
    async def go() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            v, host = session(taken.getsockname()[1])
            with pytest.raises(ProxyListenFailed, match=r"cannot open the proxy on 127\.0\.0\.1:"):
                await v._bring_up(object())
            assert host.calls == []
            await v._tear_down()
            assert host.calls == ["down"]

    run(go())


def test_attach_and_detach_reach_the_proxy_like_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "CONNECTION_WAIT", 0.05)

    async def go() -> None:
        v, _ = session()
        assert v.proxy is not None
        with pytest.raises(TimeoutError):  # not attached yet: a request waits (bounded) for a connection
            await v.proxy._pool()
        v._on_attach()
        assert v.bridge.connection is v.ssh.pool
        assert await v.proxy._pool() is v.ssh.pool
        v._on_detach()
        assert v.bridge.connection is None
        with pytest.raises(TimeoutError):
            await v.proxy._pool()

    run(go())


async def udp_associate(port: int) -> tuple[asyncio.StreamWriter, tuple[str, int]]:
    """A SOCKS5 UDP ASSOCIATE on the proxy at 127.0.0.1:`port`; the control connection and the relay."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x03\x00\x01" + bytes(6))
    reply = await reader.readexactly(10)
    assert reply[:4] == b"\x05\x00\x00\x01", reply
    return writer, (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])


def socks_udp(host: str, port: int, payload: bytes) -> bytes:
    return b"\x00\x00\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port) + payload


def test_udp_replies_go_to_the_proxy_association_else_into_the_tun() -> None:
    async def go() -> None:
        v, _ = session()
        assert v.proxy is not None
        v.tun_stack = FakeTunStack()  # type: ignore[assignment]
        to_agent: list[tuple[Any, ...]] = []
        v.ssh.relay.datagram_from_app = lambda src, dst, payload: to_agent.append((src, dst, payload))  # type: ignore[method-assign]
        await v.proxy.start()
        control, relay = await udp_associate(v.proxy.server.addresses[0][1])
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendto(client, socks_udp(*TARGET, b"ping"), relay)
            for _ in range(200):
                if to_agent:
                    break
                await asyncio.sleep(0.01)
            assert to_agent == [(relay, TARGET, b"ping")]  # through the VPN's own session, keyed by the relay
            v._udp_to_app(TARGET, relay, b"pong")
            data = await asyncio.wait_for(loop.sock_recv(client, 2048), 5)
            assert data == socks_udp(*TARGET, b"pong")
            app = ("100.64.0.2", 40000)
            v._udp_to_app(TARGET, app, b"for the tun")
            assert v.tun_stack.sent == [(TARGET, app, b"for the tun")]  # type: ignore[attr-defined]
            assert v.proxy.takes_udp(relay) and not v.proxy.takes_udp(app)
        finally:
            client.close()
            control.close()
            await v._tear_down()

    run(go())


def test_the_proxy_counts_in_the_status_and_closes_with_the_vpn() -> None:
    async def go() -> None:
        v, host = session()
        assert v.proxy is not None
        await v.proxy.start()
        port = v.proxy.server.addresses[0][1]
        stats = v.proxy.server.stats
        stats.clients, stats.active, stats.bytes_up, stats.bytes_down = 3, 1, 100, 2000
        stats.replies["CONNECTION_REFUSED"] += 1
        doc = v.status_document()
        assert check_status(doc) == [], doc
        assert doc["proxy"] == f"127.0.0.1:{port}"
        assert doc["tcp"] == {"open": 1, "total": 3, "refused": 1, "failed": 0}
        assert doc["bytes"] == {"up": 100, "down": 2000}
        await v._tear_down()
        assert host.calls == ["down"]
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    run(go())
