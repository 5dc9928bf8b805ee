"""The proxy's lean accept path (`frontends.stream`) and its one-timer deadlines (`frontends.deadlines`), on
loopback sockets: the handshake however the client splits it, clients that vanish mid-handshake, no fd or
selector registration left behind after many connections, and flow control when the client does not read."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.unit.test_socks_server import CallbackBackend, FakeBackend, v4
from x2ssh.frontends import stream as stream_module
from x2ssh.frontends.deadlines import Deadlines
from x2ssh.frontends.socks import SocksServer, SocksSettings
from x2ssh.frontends.stream import SocketStream, StreamListener, listen, supports_streams

CONNECT = b"\x05\x01\x00" + v4("10.0.0.1", 80)
GREETING = b"\x05\x01\x00"
SUCCESS = b"\x05\x00\x00\x01" + bytes(6)


def run(test: Callable[[], Awaitable[None]]) -> None:
    """Run `test` on a fresh selector loop; any error the loop reports fails it."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        await test()

    asyncio.run(main())
    assert not errors, errors


async def lean_server(backend: FakeBackend | None = None, **settings: Any) -> tuple[SocksServer, int]:
    server = SocksServer(backend or FakeBackend(), "127.0.0.1", 0, settings=SocksSettings(**settings))
    await server.start()
    assert server._listeners, "a selector loop serves clients on the lean path"
    return server, server.addresses[0][1]


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


def registrations() -> tuple[int, int]:
    """(open fds of this process, selector registrations of the running loop). Sockets of earlier tests
    that only the garbage collector closes are collected first, so they do not count."""
    gc.collect()
    loop = asyncio.get_running_loop()
    return len(os.listdir("/proc/self/fd")), len(loop._selector.get_map())  # type: ignore[attr-defined]


def test_supports_streams_on_selector_loops_only() -> None:
    loop = asyncio.SelectorEventLoop()
    assert supports_streams(loop)
    loop.close()

    class OtherLoop(asyncio.AbstractEventLoop):  # e.g. Windows' proactor loop: no add_reader on sockets
        pass

    assert not supports_streams(OtherLoop.__new__(OtherLoop))  # type: ignore[type-abstract]


def test_greeting_and_request_in_one_write_get_one_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends greeting and CONNECT together gets the method selection and the reply in one
    write, in RFC 1928 order."""
    writes: list[bytes] = []
    real = SocketStream.write

    def recording(self: SocketStream, data: Any) -> None:
        writes.append(bytes(data))
        real(self, data)

    monkeypatch.setattr(SocketStream, "write", recording)

    async def test() -> None:
        backend = FakeBackend()
        server, port = await lean_server(backend)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GREETING + CONNECT + b"early")
        assert await reader.readexactly(12) == b"\x05\x00" + SUCCESS
        await until(lambda: bytes(backend.channels[0].written) == b"early")
        assert writes[0] == b"\x05\x00" + SUCCESS
        writer.close()
        await server.close()

    run(test)


def test_a_client_that_trickles_byte_by_byte() -> None:
    """One byte per segment: the method selection comes as soon as the greeting is whole (the client waits
    for it), the reply once the request is; bytes after the request reach the channel."""

    async def test() -> None:
        backend = FakeBackend()
        server, port = await lean_server(backend)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in GREETING:
            writer.write(bytes((byte,)))
            await writer.drain()
            await asyncio.sleep(0.005)
        assert await reader.readexactly(2) == b"\x05\x00"
        for byte in CONNECT:
            assert not backend.opened
            writer.write(bytes((byte,)))
            await writer.drain()
            await asyncio.sleep(0.005)
        assert await reader.readexactly(10) == SUCCESS
        for byte in b"hello":
            writer.write(bytes((byte,)))
            await asyncio.sleep(0.005)
        await until(lambda: bytes(backend.channels[0].written) == b"hello")
        writer.close()
        await server.close()

    run(test)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_an_abort_mid_handshake_frees_the_client(how: str) -> None:
    async def test() -> None:
        server, port = await lean_server()
        before = registrations()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GREETING + CONNECT[:4])
        await until(lambda: server.stats.active == 1)
        if how == "reset":
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        writer.transport.abort()
        await until(lambda: server.stats.active == 0)
        await until(lambda: registrations() == before)
        assert server.stats.protocol_errors == (1 if how == "fin" else 0)  # a FIN mid-handshake is an error
        assert len(server.handshakes or ()) == 0
        await server.close()

    run(test)


def test_a_thousand_connections_leave_no_fd_or_registration_behind() -> None:
    """Complete tunnels closed by the client, by the channel, handshakes abandoned with FIN or reset, silent
    clients and refused requests: afterwards the process holds the fds and selector entries it had."""

    async def one(port: int, number: int, backend: FakeBackend) -> None:
        kind = number % 5
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        if kind == 0:  # a tunnel the client ends
            writer.write(GREETING + CONNECT + b"x")
            assert await reader.readexactly(12) == b"\x05\x00" + SUCCESS
            writer.write_eof()
        elif kind == 1:  # a refused CONNECT
            writer.write(GREETING + b"\x05\x01\x00" + v4("10.9.9.9", 80))
            assert (await reader.read())[:4] == b"\x05\x00\x05\x05"
        elif kind == 2:  # half a greeting, then a reset
            writer.write(b"\x05")
            await asyncio.sleep(0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 3:  # connects and closes without a byte
            pass
        else:  # a tunnel the server's side ends
            tag = b"client %d" % number
            writer.write(GREETING + CONNECT + tag)
            assert await reader.readexactly(12) == b"\x05\x00" + SUCCESS
            await until(lambda: any(c.written == tag for c in backend.channels))
            channel = next(c for c in backend.channels if c.written == tag)
            channel.session.data_received(b"bye", None)
            channel.session.connection_lost(None)
            assert await reader.read() == b"bye"
        writer.transport.abort()

    async def test() -> None:
        backend = FakeBackend()
        backend.errors["10.9.9.9"] = ConnectionRefusedError()
        server, port = await lean_server(backend)
        before = registrations()
        async with asyncio.timeout(120):
            for batch in range(20):
                await asyncio.gather(*(one(port, batch * 50 + i, backend) for i in range(50)))
        for channel in backend.channels:
            if channel.state == "open":
                channel.session.connection_lost(None)
        await until(lambda: server.stats.active == 0)
        await until(lambda: registrations() == before)
        assert server.stats.clients == 1000
        assert len(server.handshakes or ()) == 0 and len(server.opens or ()) == 0
        await server.close()

    run(test)


class Sink(asyncio.Protocol):
    """Writes `total` bytes as fast as the transport lets it, then closes; counts the pauses."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.pauses = 0
        self.resumes = 0
        self.paused = False
        self.most_buffered = 0
        self.lost = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        self._fill()

    def _fill(self) -> None:
        while not self.paused and self.sent < self.total:
            block = bytes(((self.sent // 4096) % 251,)) * 4096
            self.transport.write(block)
            self.sent += len(block)
            self.most_buffered = max(self.most_buffered, self.transport.get_write_buffer_size())
        if self.sent >= self.total:
            self.transport.close()

    def pause_writing(self) -> None:
        self.pauses += 1
        self.paused = True

    def resume_writing(self) -> None:
        self.resumes += 1
        self.paused = False
        asyncio.get_running_loop().call_soon(self._fill)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def test_flow_control_when_the_client_does_not_read() -> None:
    """The transport buffers at most about its high-water mark while the client reads nothing, tells the
    protocol to pause and resume, and delivers every byte in order before the close."""
    total = 48 * 1024 * 1024  # more than the kernel's socket buffers can hold

    async def test() -> None:
        loop = asyncio.get_running_loop()
        sinks: list[Sink] = []

        def factory() -> Sink:
            sinks.append(Sink(total))
            return sinks[-1]

        listener = StreamListener(loop, listen("127.0.0.1", 0), factory)
        listener.start()
        reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2], limit=1 << 20)
        await until(lambda: bool(sinks) and sinks[0].paused)
        await asyncio.sleep(0.2)  # not reading: the kernel's buffers fill, then the sink must wait
        sink = sinks[0]
        assert sink.paused and sink.sent < total
        received = bytearray()
        while chunk := await reader.read(1 << 20):
            received += chunk
        assert len(received) == total
        assert all(received[i] == (i // 4096) % 251 for i in range(0, total, 4096))
        assert await sink.lost is None
        assert sink.pauses >= 1 and sink.resumes >= 1
        assert sink.most_buffered <= 64 * 1024 + 4096  # never more than the high-water mark and a block
        writer.close()
        listener.close()

    run(test)


class Echo(asyncio.Protocol):
    def __init__(self, keep_open: bool = True, fail: bool = False) -> None:
        self.keep_open = keep_open
        self.fail = fail
        self.lost: list[Exception | None] = []
        self.eofs = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("a bug in the protocol")
        self.transport.writelines([data, b"|", data])

    def eof_received(self) -> bool:
        self.eofs += 1
        self.transport.write(b"bye")
        self.transport.write_eof()
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


@pytest.mark.parametrize("keep_open", [True, False])
def test_stream_half_close_writelines_and_one_connection_lost(keep_open: bool) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        echoes: list[Echo] = []

        def factory() -> Echo:
            echoes.append(Echo(keep_open))
            return echoes[-1]

        listener = StreamListener(loop, listen("127.0.0.1", 0), factory)
        listener.start()
        reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
        writer.write(b"ab")
        assert await reader.readexactly(5) == b"ab|ab"
        writer.write_eof()
        assert await reader.read() == b"bye"  # the FIN comes after what was written before it
        echo = echoes[0]
        if keep_open:
            await asyncio.sleep(0.05)  # an EOF is reported once, however long the half-open lasts
            assert not echo.lost and echo.eofs == 1
            echo.transport.close()
        await until(lambda: bool(echo.lost))
        await asyncio.sleep(0.01)
        assert echo.lost == [None]
        assert echo.transport.get_extra_info("peername") == writer.get_extra_info("sockname")
        writer.close()
        listener.close()

    run(test)


def test_a_client_s_reader_and_writer_come_and_go_without_asyncio_s_transport_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream adds and removes its socket's reader and writer with the selector loop's own methods:
    asyncio's public ones first check that no asyncio transport owns the fd, which for our sockets raises
    and catches a KeyError each time. The selector ends up as it was, the echo and the FIN intact."""

    async def test() -> None:
        loop = asyncio.get_running_loop()
        checks: list[int] = []
        real_check = loop._ensure_fd_no_transport  # type: ignore[attr-defined]

        def check(fd: Any) -> None:
            checks.append(fd)
            real_check(fd)

        monkeypatch.setattr(loop, "_ensure_fd_no_transport", check)
        writers: list[int] = []
        real_add_writer = loop._add_writer  # type: ignore[attr-defined]

        def add_writer(fd: int, *args: Any) -> Any:
            writers.append(fd)
            return real_add_writer(fd, *args)

        monkeypatch.setattr(loop, "_add_writer", add_writer)
        echoes: list[Echo] = []

        class SmallSendBuffer(Echo):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        def factory() -> Echo:
            echoes.append(SmallSendBuffer(keep_open=False))
            return echoes[-1]

        listener = StreamListener(loop, listen("127.0.0.1", 0), factory)
        listener.start()
        before = registrations()
        client = socket.create_connection(listener.sockets[0].getsockname()[:2])
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.setblocking(False)
        big = bytes(b for b in range(256) if b != ord("|")) * 4096  # 1 MB in, 2 out: the writer waits
        await loop.sock_sendall(client, big)
        client.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            chunk = await loop.sock_recv(client, 1 << 16)
            if not chunk:
                break
            got += chunk
        assert got.endswith(b"bye") and len(got) - 3 - got.count(b"|") == 2 * len(big)  # each read, twice
        await until(lambda: bool(echoes[0].lost))
        client.close()
        assert registrations() == before
        stream_fds = {echo.transport._fd for echo in echoes}
        assert not stream_fds & set(checks), "asyncio's check ran for the stream's socket"
        assert stream_fds & set(writers), "the client took everything at once: the writer never waited"
        listener.close()

    run(test)


def test_a_protocol_bug_closes_only_that_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        echoes: list[Echo] = []

        def factory() -> Echo:
            echoes.append(Echo(fail=not echoes))  # the first one has a bug
            return echoes[-1]

        listener = StreamListener(loop, listen("127.0.0.1", 0), factory)
        listener.start()
        where = listener.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(*where)
        writer.write(b"x")
        assert await reader.read() == b""
        reader2, writer2 = await asyncio.open_connection(*where)
        writer2.write(b"y")
        assert await reader2.readexactly(3) == b"y|y"
        assert isinstance(echoes[0].lost[0], RuntimeError)
        writer.close()
        writer2.close()
        listener.close()

    run(test)
    assert "data_received failed" in caplog.text


def test_listen_reports_a_taken_port() -> None:
    taken = listen("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="error while attempting to bind"):
            listen("127.0.0.1", taken[0].getsockname()[1])
    finally:
        for sock in taken:
            sock.close()


def test_deadlines_fire_in_order_once_and_not_when_discarded() -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        deadlines: Deadlines[str] = Deadlines(loop, 0.05, fired.append)
        for key in "abcd":
            deadlines.add(key)
        deadlines.discard("b")
        deadlines.add("a")  # restarted: now after d
        assert len(deadlines) == 3 and "b" not in deadlines
        await until(lambda: len(fired) == 3)
        assert fired == ["c", "d", "a"]
        deadlines.add("e")
        deadlines.close()
        await asyncio.sleep(0.1)
        assert fired == ["c", "d", "a"]

    run(test)


def test_deadlines_survive_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        fired: list[str] = []

        def callback(key: Any) -> None:
            if key == "bad":
                raise ValueError("boom")
            fired.append(key)

        deadlines = Deadlines(asyncio.get_running_loop(), 0.01, callback)
        deadlines.add("bad")
        deadlines.add("good")
        await until(lambda: fired == ["good"])

    run(test)
    assert "deadline callback" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accepted_sockets_are_made_without_socket_accept(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """The listener wraps each accepted fd itself (`socket.accept` converts family and type to enums per
    socket): the socket it serves has the listener's family and type, TCP_NODELAY, and the peer's address."""
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")

    def forbidden(self: socket.socket) -> Any:
        raise AssertionError("socket.accept() on the lean path")

    async def test() -> None:
        loop = asyncio.get_running_loop()
        echoes: list[Echo] = []
        try:
            socks = listen(host, 0)
        except OSError as exc:
            pytest.skip(f"cannot listen on {host}: {exc}")
        listener = StreamListener(loop, socks, lambda: echoes.append(Echo()) or echoes[-1])
        listener.start()
        monkeypatch.setattr(socket.socket, "accept", forbidden)
        reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
        writer.write(b"z")
        async with asyncio.timeout(5):
            assert await reader.readexactly(3) == b"z|z"
        served = echoes[0].transport.get_extra_info("socket")
        assert (served.family, served.type) == (listener.sockets[0].family, socket.SOCK_STREAM)
        assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert echoes[0].transport.get_extra_info("peername")[:2] == writer.get_extra_info("sockname")[:2]
        writer.close()
        listener.close()

    run(test)


def test_a_connection_leaves_each_deadline_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client discards itself only from the deadline it is in (handshake, then channel open): two
    discards for a tunnel opened by callback, not two per step; the deadlines still fire (other tests)."""
    discards: list[tuple[Deadlines[Any], Any]] = []
    real = Deadlines.discard

    def counting(self: Deadlines[Any], key: Any) -> None:
        discards.append((self, key))
        real(self, key)

    monkeypatch.setattr(Deadlines, "discard", counting)

    async def test() -> None:
        backend = CallbackBackend()
        server, port = await lean_server(backend)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GREETING + CONNECT)
        assert await reader.readexactly(12) == b"\x05\x00" + SUCCESS
        assert backend.by_callback == 1
        handshakes, opens = server.handshakes, server.opens
        assert handshakes is not None and opens is not None and not handshakes and not opens
        await server.close()  # connection_lost: nothing more to discard
        writer.close()
        assert [deadlines for deadlines, _ in discards] == [handshakes, opens]

    run(test)


def test_a_full_socket_is_read_in_reads_larger_than_asyncio_s() -> None:
    """On a bulk upload the client's socket holds more than asyncio's 256 KiB read: one loop turn takes
    up to MAX_READ (fewer turns, writevs and send-path calls per GB), every byte in order."""

    class Sink(asyncio.Protocol):
        def __init__(self) -> None:
            self.reads: list[int] = []
            self.data = bytearray()

        def data_received(self, data: bytes) -> None:
            self.reads.append(len(data))
            self.data += data

    async def test() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        for sock, option in ((ours, socket.SO_RCVBUF), (theirs, socket.SO_SNDBUF)):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        payload = os.urandom(3 << 20)
        theirs.setblocking(False)
        sent = 0
        while sent < len(payload):  # fill the socket before the stream reads anything
            try:
                sent += theirs.send(payload[sent:])
            except BlockingIOError:
                break
        ours.setblocking(False)
        sink = Sink()
        stream = SocketStream(loop, ours, sink)
        stream.start()
        await until(lambda: len(sink.data) >= sent)
        assert sink.data == payload[:sent]
        assert sent > 2 * stream_module.MAX_READ  # the socket held several reads' worth
        assert max(sink.reads) > 256 * 1024
        stream.abort()
        theirs.close()
        await asyncio.sleep(0)

    run(test)


def test_reads_go_into_the_target_s_buffers_when_it_offers_some() -> None:
    """`read_into`: after a large read, reads fill the target's buffers in order (one recvmsg_into each) and
    report the count, until one fills less than offered; with no buffers on offer, data_received; the EOF
    is reported either way."""

    class Target(asyncio.Protocol):
        def __init__(self) -> None:
            self.arena = bytearray(8)
            self.offer = True
            self.got = bytearray()
            self.by_data_received = bytearray()
            self.eofs = 0

        def read_buffers(self) -> list[memoryview] | None:
            view = memoryview(self.arena)
            return [view[:3], view[3:8]] if self.offer else None

        def buffers_read(self, n: int) -> None:
            self.got += self.arena[:n]

        def data_received(self, data: bytes) -> None:
            self.by_data_received += data

        def eof_received(self) -> bool:
            self.eofs += 1
            return True

    async def test() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        bulk = os.urandom(stream_module.BULK_READ)
        theirs.sendall(bulk)  # in the socket before the first read: one large read
        target = Target()
        stream = SocketStream(loop, ours, target)
        stream.read_into(target)
        stream.start()
        await until(lambda: len(target.by_data_received) == len(bulk))
        theirs.sendall(b"abcdefghijkl")  # more than the 8 bytes offered: two reads into them
        await until(lambda: len(target.got) == 12)
        assert target.got == b"abcdefghijkl" and target.by_data_received == bulk
        theirs.sendall(b"plain")  # the last read filled less than offered: back to data_received
        await until(lambda: target.by_data_received.endswith(b"plain"))
        target.offer = False
        theirs.sendall(bulk + bulk)
        await until(lambda: len(target.by_data_received) == 3 * len(bulk) + 5)
        theirs.shutdown(socket.SHUT_WR)
        await until(lambda: target.eofs == 1)
        assert target.got == b"abcdefghijkl"
        stream.abort()
        theirs.close()
        await asyncio.sleep(0)

    run(test)


def test_a_spliced_client_s_bytes_are_read_into_the_channel_s_packets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once spliced to an SSH channel, the lean path reads the client's bytes straight into the buffers the
    channel offers (no bytes object per read, no `write`); without buffers on offer, `write` as before."""
    from tests.unit.test_socks_server import FakeChannel
    from x2ssh.frontends import socks as socks_module

    class ArenaChannel(FakeChannel):
        def __init__(self, session: Any) -> None:
            super().__init__(session)
            self.arena = bytearray(128 * 1024)
            self.offer = True
            self.read_in = 0
            self.got = bytearray()  # in order, however each piece came

        def write(self, data: bytes) -> None:
            super().write(data)
            self.got += data

        def read_buffers(self) -> list[memoryview] | None:
            view = memoryview(self.arena)
            return [view[:40000], view[40000:]] if self.offer else None

        def sent_read_buffers(self, n: int) -> None:
            self.read_in += n
            self.got += self.arena[:n]

    class ArenaBackend(FakeBackend):
        async def open_tcp(self, host: str, port: int, factory: Any, origin: Any) -> Any:
            session = factory()
            channel = ArenaChannel(session)
            self.channels.append(channel)
            session.connection_made(channel)
            return channel, session

    monkeypatch.setattr(socks_module, "SshTcpChannel", ArenaChannel)

    async def test() -> None:
        backend = ArenaBackend()
        server, port = await lean_server(backend)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GREETING + CONNECT)
        assert await reader.readexactly(2) == b"\x05\x00"
        assert await reader.readexactly(10) == SUCCESS
        channel = backend.channels[0]
        assert isinstance(channel, ArenaChannel)
        payload = os.urandom(4 << 20)
        writer.write(payload)
        await until(lambda: len(channel.got) == len(payload))
        assert channel.got == payload and channel.read_in > 0  # much of it read straight into the buffers
        assert server.stats.bytes_up == len(payload)
        channel.offer = False
        written = len(channel.written)
        writer.write(b"by write")
        await until(lambda: channel.written[written:] == b"by write")
        writer.close()
        await server.close()

    run(test)


class _CountingCallSoon:
    """Counts the loop's call_soon calls (the loop callbacks a turn's deferred work costs), but not a task's
    own steps (an `await asyncio.sleep(0)` of the test)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = loop.call_soon

        def call_soon(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
            if not isinstance(getattr(callback, "__self__", None), asyncio.Task):
                self.count += 1
            return real(callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_soon", call_soon)


def test_turn_batch_runs_in_order_in_one_callback_and_isolates_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    errors: list[dict[str, Any]] = []

    async def test() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        counter = _CountingCallSoon(loop, monkeypatch)
        batch = stream_module.TurnBatch(loop)
        ran: list[Any] = []

        def fail(arg: Any) -> None:
            raise RuntimeError(arg)

        def again(arg: Any) -> None:
            ran.append(arg)
            batch.call_soon(ran.append, "next turn")  # made while the batch runs: not in this run

        for arg in ("a", "b"):
            batch.call_soon(ran.append, arg)
        batch.call_soon(fail, "boom")
        batch.call_soon(again, "c")
        assert counter.count == 1 and ran == []  # deferred: nothing runs within the call
        await asyncio.sleep(0)
        assert ran == ["a", "b", "c"]
        assert counter.count == 2  # one more loop callback, for the call made during the run
        await asyncio.sleep(0)
        assert ran == ["a", "b", "c", "next turn"]

    asyncio.run(test())
    assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)


def test_streams_closed_in_one_turn_cost_one_loop_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        batch = stream_module.TurnBatch(loop)
        pairs = [socket.socketpair() for _ in range(3)]
        sinks = [Echo() for _ in pairs]
        streams = []
        for (ours, _), sink in zip(pairs, sinks, strict=True):
            ours.setblocking(False)
            streams.append(SocketStream(loop, ours, sink, batch=batch))
            streams[-1].start()
        counter = _CountingCallSoon(loop, monkeypatch)
        streams[0].close()
        streams[1].abort()
        streams[2].close()
        assert counter.count == 1  # one callback for all three connection_lost
        assert all(not sink.lost for sink in sinks)  # in a later turn, not within close()
        await asyncio.sleep(0)
        assert [sink.lost for sink in sinks] == [[None], [None], [None]]
        assert all(ours.fileno() == -1 for ours, _ in pairs)  # each socket closed with its connection_lost
        for _, theirs in pairs:
            theirs.close()

    run(test)


def test_channel_data_for_many_clients_in_one_turn_costs_one_loop_callback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        loop = asyncio.get_running_loop()
        backend = FakeBackend()
        server, port = await lean_server(backend)
        clients = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GREETING + CONNECT)
            assert await reader.readexactly(12) == b"\x05\x00" + SUCCESS
            clients.append((reader, writer))
        counter = _CountingCallSoon(loop, monkeypatch)
        for i, channel in enumerate(backend.channels):  # as packets for three channels in one SSH read
            channel.session.data_received(b"to %d;" % i, None)
            channel.session.data_received(b"more", None)
        assert counter.count == 1
        for i, (reader, writer) in enumerate(clients):
            assert await reader.readexactly(9) == b"to %d;more" % i
            writer.close()
        await server.close()

    run(test)


@pytest.mark.parametrize("inherited", [True, False], ids=["inherited", "not-inherited"])
def test_accepted_sockets_have_nodelay_without_a_setsockopt_each_where_it_is_inherited(
    monkeypatch: pytest.MonkeyPatch, inherited: bool
) -> None:
    calls: list[tuple[int, int]] = []
    real_setsockopt, real_getsockopt = socket.socket.setsockopt, socket.socket.getsockopt

    def setsockopt(self: socket.socket, level: int, option: int, *value: Any) -> None:
        calls.append((self.fileno(), option))
        real_setsockopt(self, level, option, *value)

    def getsockopt(self: socket.socket, level: int, option: int, *size: Any) -> Any:
        if option == socket.TCP_NODELAY and not inherited and self.fileno() not in listening:
            return 0  # as where accepted sockets do not inherit it
        return real_getsockopt(self, level, option, *size)

    listening: set[int] = set()

    async def test() -> None:
        loop = asyncio.get_running_loop()
        echoes: list[Echo] = []
        socks = listen("127.0.0.1", 0)
        listening.update(sock.fileno() for sock in socks)
        monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
        monkeypatch.setattr(socket.socket, "getsockopt", getsockopt)
        listener = StreamListener(loop, socks, lambda: echoes.append(Echo()) or echoes[-1])
        listener.start()
        writers = []
        for i in range(3):
            reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
            writer.write(b"%d" % i)
            assert await reader.readexactly(3) == b"%d|%d" % (i, i)
            writers.append(writer)
        served = {echo.transport.get_extra_info("socket").fileno() for echo in echoes}
        for echo in echoes:
            assert real_getsockopt(
                echo.transport.get_extra_info("socket"), socket.IPPROTO_TCP, socket.TCP_NODELAY
            )
        # (asyncio's client sockets in this test set it too: only the served ones count)
        per_socket = [fd for fd, option in calls if option == socket.TCP_NODELAY and fd in served]
        assert len(per_socket) == (0 if inherited else 3)
        for writer in writers:
            writer.close()
        listener.close()

    run(test)


def test_what_the_socket_does_not_take_is_kept_without_a_copy_unless_it_could_change() -> None:
    """Bytes and views of bytes (a channel's payload is a view of its opened packet) wait in the buffer as
    they are; a bytearray or a view of one is copied, as the caller may reuse it. All arrive in order."""

    async def test() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.setblocking(False)
        stream = SocketStream(loop, ours, asyncio.Protocol())
        stream.start()
        packet = os.urandom(200_000)
        view = memoryview(packet)[10:150_000]
        scratch = bytearray(os.urandom(100_000))
        stream.writelines([view, packet])
        stream.write(memoryview(scratch)[:50_000])
        stream.write(scratch)
        expected = bytes(view) + packet + bytes(scratch[:50_000]) + bytes(scratch)
        kept = list(stream._buffer)
        assert any(part is packet for part in kept)  # (the view may be cut where the socket stopped)
        assert any(type(part) is memoryview and part.obj is packet for part in kept)
        assert not any(isinstance(part, memoryview) and part.obj is scratch for part in kept)
        assert not any(part is scratch for part in kept)
        scratch[:] = bytes(len(scratch))  # the caller reuses its buffer
        theirs.setblocking(False)
        got = bytearray()
        while len(got) < len(expected):
            await asyncio.sleep(0)
            with contextlib.suppress(BlockingIOError):
                got += theirs.recv(1 << 20)
        assert bytes(got) == expected
        stream.abort()
        theirs.close()

    run(test)
