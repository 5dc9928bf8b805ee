"""The proxy's orchestration against a fake backend (loopback sockets, no SSH): reply codes for every way an
open can fail, timeouts, flow control both ways, data that comes early, limits, and the safe-bind rule."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh
import pytest

from x2ssh.errors import UsageError
from x2ssh.frontends import socks, stream
from x2ssh.frontends.socks import (
    NameNotFound,
    ProxyBindRefused,
    SocksServer,
    SocksSettings,
    check_bind,
    parse_listen,
)
from x2ssh.frontends.socks_backend import (
    CHANNEL_MAX_PACKET,
    CHANNEL_WINDOW,
    SshChannelBackend,
    reply_for_error,
)
from x2ssh.frontends.socks_protocol import Credentials, Reply


class FakeChannel:
    def __init__(self, session: asyncssh.SSHTCPSession) -> None:
        self.session = session
        self.written = bytearray()
        self.eof = False
        self.paused = False
        self.pauses = 0
        self.state = "open"

    def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.state = "closed"

    def abort(self) -> None:
        self.state = "aborted"

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class FakeBackend:
    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names = names or {}
        self.errors: dict[str, BaseException] = {}  # by address
        self.hang_open = False
        self.hang_resolve = False
        self.banner = b""
        self.opened: list[tuple[str, int]] = []
        self.channels: list[FakeChannel] = []
        self.lookups: list[str] = []

    async def resolve(self, name: str) -> list[str]:
        self.lookups.append(name)
        if self.hang_resolve:
            await asyncio.sleep(3600)
        if name not in self.names:
            raise NameNotFound(name)
        return self.names[name]

    async def open_tcp(
        self, host: str, port: int, factory: Callable[[], Any], origin: tuple[str, int]
    ) -> Any:
        self.opened.append((host, port))
        if self.hang_open:
            await asyncio.sleep(3600)
        if host in self.errors:
            raise self.errors[host]
        session = factory()
        channel = FakeChannel(session)
        self.channels.append(channel)
        session.connection_made(channel)
        if self.banner:
            session.data_received(self.banner, None)  # the server speaks before our reply is written
        return channel, session

    def udp_send(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        pass


class CallbackBackend(FakeBackend):
    """A FakeBackend that also opens by callback (`open_tcp_now`), as the session's SshChannelBackend does."""

    by_callback = 0

    def open_tcp_now(
        self, host: str, port: int, factory: Callable[[], Any], origin: tuple[str, int], on_done: Any
    ) -> asyncio.Task[Any]:
        self.by_callback += 1
        task = asyncio.get_running_loop().create_task(self.open_tcp(host, port, factory, origin))

        def finished(task: asyncio.Task[Any]) -> None:
            if not task.cancelled():
                exc = task.exception()
                on_done(None if exc else task.result()[0], exc)

        task.add_done_callback(finished)
        return task


LEAN = {"on": True}  # which accept path `started` asks for (the `accept_path` fixture sets it)


@pytest.fixture(autouse=True, params=[True, False], ids=["lean", "asyncio"])
def accept_path(request: pytest.FixtureRequest) -> bool:
    """Each proxy test on both accept paths: the lean listener and asyncio's create_server."""
    LEAN["on"] = request.param
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=[FakeBackend, CallbackBackend], ids=["task", "callback"])
def fake(request: pytest.FixtureRequest) -> type[FakeBackend]:
    """Each proxy test with a backend that opens by task only, and with one that opens by callback."""
    return request.param  # type: ignore[no-any-return]


def run(test: Callable[[], Awaitable[None]]) -> None:
    """Run `test` on a fresh loop; any error the loop saw (e.g. "exception never retrieved") fails it."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        await test()

    asyncio.run(main())
    assert not errors, errors


async def started(backend: FakeBackend, **kwargs: Any) -> tuple[SocksServer, int]:
    kwargs.setdefault("lean", LEAN["on"])
    server = SocksServer(backend, "127.0.0.1", 0, settings=kwargs.pop("settings", None), **kwargs)
    await server.start()
    return server, server.addresses[0][1]


async def socks_connect(port: int, address: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00\x05\x01\x00" + address)
    assert await reader.readexactly(2) == b"\x05\x00"
    reply = await reader.readexactly(10)
    return reader, writer, reply[1]


def v4(host: str, port: int) -> bytes:
    return b"\x01" + bytes(int(x) for x in host.split(".")) + struct.pack("!H", port)


def name(text: str, port: int) -> bytes:
    return b"\x03" + bytes((len(text),)) + text.encode() + struct.pack("!H", port)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused"),
            Reply.CONNECTION_REFUSED,
        ),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "No route to host"), Reply.HOST_UNREACHABLE),
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Network is unreachable"),
            Reply.NETWORK_UNREACHABLE,
        ),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection timed out"), Reply.TTL_EXPIRED),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "open failed"), Reply.HOST_UNREACHABLE),
        (
            asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "prohibited"),
            Reply.NOT_ALLOWED,
        ),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "no room"), Reply.GENERAL_FAILURE),
        (TimeoutError(), Reply.TTL_EXPIRED),
        (ConnectionRefusedError(), Reply.CONNECTION_REFUSED),
        (ConnectionError("no SSH connection"), Reply.GENERAL_FAILURE),
        (asyncssh.ConnectionLost("gone"), Reply.GENERAL_FAILURE),
        (NameNotFound("x"), Reply.HOST_UNREACHABLE),
    ],
)
def test_open_errors_become_reply_codes(error: BaseException, code: Reply, fake: type[FakeBackend]) -> None:
    assert reply_for_error(error) == code

    async def test() -> None:
        backend = fake()
        backend.errors["10.0.0.1"] = error
        server, port = await started(backend)
        reader, writer, got = await socks_connect(port, v4("10.0.0.1", 80))
        assert got == code
        assert getattr(backend, "by_callback", 1) == 1
        assert await reader.read() == b""  # closed after the error reply
        writer.close()
        await server.close()

    if not isinstance(error, NameNotFound):
        run(test)


def test_names_are_resolved_first_and_each_address_tried(fake: type[FakeBackend]) -> None:
    async def test() -> None:
        backend = fake({"two.test": ["10.0.0.1", "10.0.0.2"]})
        backend.errors["10.0.0.1"] = asyncssh.ChannelOpenError(2, "Connection refused")
        server, port = await started(backend)
        _, writer, code = await socks_connect(port, name("two.test", 443))
        assert code == 0
        assert backend.lookups == ["two.test"]
        assert backend.opened == [("10.0.0.1", 443), ("10.0.0.2", 443)]
        writer.close()
        _, writer2, code = await socks_connect(port, name("missing.test", 1))
        assert code == Reply.HOST_UNREACHABLE
        _, writer3, code = await socks_connect(port, name("10.9.9.9", 7))  # an address sent as a name
        assert (
            code == 0
            and backend.lookups == ["two.test", "missing.test"]
            and backend.opened[-1] == ("10.9.9.9", 7)
        )
        writer2.close()
        writer3.close()
        await server.close()

    run(test)


def test_timeouts_are_ttl_expired(fake: type[FakeBackend]) -> None:
    async def test() -> None:
        backend = fake({"slow.test": ["10.0.0.1"]})
        settings = SocksSettings(open_timeout=0.2, resolve_timeout=0.2)
        server, port = await started(backend, settings=settings)
        backend.hang_open = True
        _, writer, code = await socks_connect(port, v4("10.0.0.1", 80))
        assert code == Reply.TTL_EXPIRED
        backend.hang_open, backend.hang_resolve = False, True
        _, writer2, code = await socks_connect(port, name("slow.test", 80))
        assert code == Reply.TTL_EXPIRED
        writer.close()
        writer2.close()
        await server.close()

    run(test)


def test_splice_data_eof_and_early_banner(fake: type[FakeBackend]) -> None:
    async def test() -> None:
        backend = fake()
        backend.banner = b"220 hello\r\n"
        server, port = await started(backend)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x05\x01\x00\x05\x01\x00" + v4("10.0.0.1", 25) + b"EHLO")  # data before the reply
        assert await reader.readexactly(12) == b"\x05\x00\x05\x00\x00\x01" + bytes(6)
        assert await reader.readexactly(11) == b"220 hello\r\n"
        channel = backend.channels[0]
        writer.write(b" me\r\n")
        writer.write_eof()
        for _ in range(100):
            if channel.eof:
                break
            await asyncio.sleep(0.01)
        assert bytes(channel.written) == b"EHLO me\r\n" and channel.eof
        channel.session.data_received(b"250 ok\r\n", None)
        channel.session.eof_received()
        assert await reader.read() == b"250 ok\r\n"
        channel.session.connection_lost(None)
        writer.close()
        await server.close()
        assert server.stats.bytes_up == 9 and server.stats.bytes_down == 19

    run(test)


def test_channel_data_of_one_turn_reaches_the_client_in_order_before_the_close(
    fake: type[FakeBackend],
) -> None:
    async def test() -> None:
        backend = fake()
        server, port = await started(backend)
        reader, writer, code = await socks_connect(port, v4("10.0.0.1", 80))
        assert code == 0
        session = backend.channels[0].session
        parts = [bytes([65 + i]) * (1000 * (i + 1)) for i in range(5)]
        for part in parts:  # one loop turn: queued, then written together
            session.data_received(part, None)
        session.connection_lost(None)  # the channel closes in the same turn: the data still goes first
        assert await reader.read() == b"".join(parts)
        writer.close()
        await server.close()
        assert server.stats.bytes_down == sum(map(len, parts))

    run(test)


def test_a_client_that_closes_after_the_channel_s_eof_closes_the_channel(fake: type[FakeBackend]) -> None:
    """Both directions done: the client's FIN becomes the channel's CLOSE (no EOF and a round trip first);
    a client that half-closes first still sends EOF and keeps reading."""

    async def test() -> None:
        backend = fake()
        server, port = await started(backend)
        reader, writer, code = await socks_connect(port, v4("10.0.0.1", 80))
        reader2, writer2, code2 = await socks_connect(port, v4("10.0.0.1", 80))
        assert code == code2 == 0
        first, second = backend.channels
        first.session.data_received(b"response", None)
        first.session.eof_received()
        assert await reader.read() == b"response"
        writer.write(b"bye")
        writer.write_eof()
        writer2.write_eof()  # the other client half-closes while its channel is still open
        for _ in range(200):
            if first.state == "closed" and second.eof:
                break
            await asyncio.sleep(0.01)
        assert first.state == "closed" and not first.eof and bytes(first.written) == b"bye"
        assert second.eof and second.state == "open"
        second.session.data_received(b"late answer", None)
        second.session.eof_received()
        assert await reader2.read() == b"late answer"
        for channel in (first, second):
            channel.session.connection_lost(None)
        writer.close()
        writer2.close()
        await server.close()

    run(test)


def test_packets_of_a_turn_reach_a_slow_client_whole_and_in_order(
    monkeypatch: pytest.MonkeyPatch, fake: type[FakeBackend], accept_path: bool
) -> None:
    """Several channel packets per loop turn leave with one writev; when the client's socket is full the rest
    goes through the transport's buffer, and later turns queue behind it: nothing lost, nothing reordered."""

    gathered: list[int] = []
    if accept_path:  # the lean transport's writelines calls os.writev itself
        real_writev = stream._writev
        assert real_writev is not None

        def counting_writev(fd: int, parts: list[bytes]) -> int:
            try:
                sent = real_writev(fd, parts)
            except BlockingIOError:
                sent = 0
                raise
            finally:
                gathered.append(sum(map(len, parts)) - sent)
            return sent

        monkeypatch.setattr(stream, "_writev", counting_writev)
    else:
        real = socks.write_gathered

        def counting(transport: Any, parts: list[bytes]) -> bytes | None:
            rest = real(transport, parts)
            gathered.append(-1 if rest is None else len(rest))
            return rest

        monkeypatch.setattr(socks, "write_gathered", counting)

    async def test() -> None:
        backend = fake()
        server, port = await started(backend)
        reader, writer, code = await socks_connect(port, v4("10.0.0.1", 80))
        assert code == 0
        session = backend.channels[0].session
        expected = bytearray()
        for turn in range(24):
            for i in range(12):  # one turn's packets, each one distinct
                part = struct.pack("!HH", turn, i) * 8192
                expected += part
                session.data_received(part, None)
            await asyncio.sleep(0)  # the client does not read yet: its socket fills
        session.connection_lost(None)
        assert await reader.read() == expected
        writer.close()
        await server.close()

    run(test)
    assert any(rest == 0 for rest in gathered)  # a turn written whole by one writev
    assert any(rest and rest > 0 for rest in gathered)  # and a full socket that took only part


def test_flow_control_both_ways(fake: type[FakeBackend]) -> None:
    async def test() -> None:
        backend = fake()
        server, port = await started(backend, settings=SocksSettings(client_write_limit=64 * 1024))
        reader, writer, code = await socks_connect(port, v4("10.0.0.1", 80))
        assert code == 0
        channel = backend.channels[0]
        # A client that does not read: the channel is paused before much piles up in the proxy.
        chunk = b"x" * 65536
        sent = 0
        while not channel.paused and sent < 64 * 1024 * 1024:
            channel.session.data_received(chunk, None)
            sent += len(chunk)
            await asyncio.sleep(0)
        assert channel.paused
        received = 0
        while received < sent:
            received += len(await reader.read(1 << 20))
        for _ in range(100):
            if not channel.paused:
                break
            await asyncio.sleep(0.01)
        assert not channel.paused and received == sent
        # A full channel: the proxy stops reading from the client until the channel drains.
        channel.session.pause_writing()
        writer.write(b"held back")
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert bytes(channel.written) == b""
        channel.session.resume_writing()
        for _ in range(100):
            if channel.written:
                break
            await asyncio.sleep(0.01)
        assert bytes(channel.written) == b"held back"
        writer.close()
        await server.close()

    run(test)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_gone_while_opening(how: str, fake: type[FakeBackend]) -> None:
    """Reading is paused while the channel opens, so the client's going is seen once the reply is written:
    a FIN is passed on as EOF (half-close, as for any flow); a reset aborts the channel."""

    async def test() -> None:
        backend = fake()
        gate = asyncio.Event()
        original = backend.open_tcp

        async def slow_open(*args: Any) -> Any:
            await gate.wait()
            return await original(*args)

        backend.open_tcp = slow_open  # type: ignore[method-assign]
        server, port = await started(backend)
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x05\x01\x00\x05\x01\x00" + v4("10.0.0.1", 80))
        while not server.stats.requests:  # the request is in (its method selection goes with the reply)
            await asyncio.sleep(0.01)
        if how == "reset":
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        writer.transport.abort()
        await asyncio.sleep(0.05)
        gate.set()
        while not backend.channels:
            await asyncio.sleep(0.01)
        channel = backend.channels[0]
        for _ in range(200):
            if channel.eof or channel.state != "open":
                break
            await asyncio.sleep(0.01)
        if how == "fin":
            assert channel.eof and channel.state == "open"
            channel.session.connection_lost(None)  # the destination closes in turn
        else:
            assert channel.state == "aborted"
        for _ in range(200):
            if server.stats.active == 0:
                break
            await asyncio.sleep(0.01)
        assert server.stats.active == 0
        await server.close()

    run(test)


def test_client_limit_and_handshake_timeout() -> None:
    async def test() -> None:
        settings = SocksSettings(max_clients=1, handshake_timeout=0.2)
        server, port = await started(FakeBackend(), settings=settings)
        reader1, writer1 = await asyncio.open_connection("127.0.0.1", port)
        writer1.write(b"\x05")  # half a greeting, then nothing
        for _ in range(100):
            if server.stats.active == 1:
                break
            await asyncio.sleep(0.01)
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        assert await reader2.read() == b""  # over the limit: closed at once
        assert server.stats.refused_clients == 1
        assert await reader1.read() == b""  # the slow one is dropped after handshake_timeout
        writer1.close()
        writer2.close()
        await server.close()

    run(test)


def test_bad_client_gets_error_reply_good_client_unaffected() -> None:
    async def test() -> None:
        backend = FakeBackend()
        server, port = await started(backend, credentials=Credentials("u", "p"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x05\x01\x00")
        assert await reader.read() == b"\x05\xff"
        reader, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"\x05\x01\x02\x01\x01u\x01p\x05\x01\x00" + v4("10.0.0.1", 80))
        assert await reader.readexactly(4 + 10) == b"\x05\x02\x01\x00\x05\x00\x00\x01" + bytes(6)
        assert server.stats.protocol_errors == 1
        writer.close()
        writer2.close()
        await server.close()

    run(test)


def test_ssh_channel_backend_opens_by_callback_on_the_pool_it_has_now() -> None:
    calls: list[Any] = []

    class Pool:
        def open_tcp_channel(self, *args: Any, **kwargs: Any) -> str:
            calls.append((args, kwargs))
            return "opening"

    pools: list[Any] = [None]
    backend = SshChannelBackend(_never, _never, None, lambda: pools[0])
    done = calls.append
    assert backend.open_tcp_now("10.0.0.1", 80, FakeChannel, ("127.0.0.1", 5555), done) is None
    pools[0] = Pool()
    assert backend.open_tcp_now("10.0.0.1", 80, FakeChannel, ("127.0.0.1", 5555), done) == "opening"
    assert calls == [
        (
            (FakeChannel, "10.0.0.1", 80, "127.0.0.1", 5555, done),
            {"window": CHANNEL_WINDOW, "max_pktsize": CHANNEL_MAX_PACKET},
        )
    ]
    assert SshChannelBackend(_never, _never).open_tcp_now("10.0.0.1", 80, FakeChannel, ("", 0), done) is None


async def _never(*args: Any) -> Any:
    raise AssertionError("not awaited on the callback path")


def test_parse_listen() -> None:
    assert parse_listen("1080") == ("localhost", 1080)
    assert parse_listen("127.0.0.1:1080") == ("127.0.0.1", 1080)
    assert parse_listen("*:1080") == ("", 1080)
    assert parse_listen(":1080") == ("", 1080)
    assert parse_listen("[::1]:9050") == ("::1", 9050)
    assert parse_listen("localhost:8") == ("localhost", 8)
    for bad in ("", "x", "0", "65536", "::1:80", "[::1]80", "host:"):
        with pytest.raises(UsageError):
            parse_listen(bad)


def test_bind_beyond_loopback_needs_credentials_or_allow_lan() -> None:
    check_bind("127.0.0.1", None, False)
    check_bind("localhost", None, False)
    check_bind("::1", None, False)
    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(ProxyBindRefused, match="--allow-lan") as info:
            check_bind(host, None, False)
        assert info.value.exit_code == 2
        check_bind(host, Credentials("u", "p"), False)
        check_bind(host, None, True)


def test_server_refuses_to_start_on_all_interfaces_without_credentials() -> None:
    async def test() -> None:
        server = SocksServer(FakeBackend(), "0.0.0.0", 0)
        with pytest.raises(ProxyBindRefused):
            await server.start()
        assert server.addresses == []

    run(test)


def test_a_client_is_a_slotted_object() -> None:
    """One per connection: slots (no per-instance dict); a typo'd attribute fails at once."""
    from x2ssh.frontends.socks import _Client

    async def main() -> None:
        client = _Client(SocksServer(FakeBackend()))
        assert not hasattr(client, "__dict__")
        with pytest.raises(AttributeError):
            client.splcied = True  # type: ignore[attr-defined]

    asyncio.run(main())
