"""The asyncssh adjustments keep every byte and its order, and packet debugging still logs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from asyncssh.logging import SSHLogger
from asyncssh.packet import SSHPacketLogger

from x2ssh.ssh import tuning as asyncssh_tuning


class FakeConnection:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def _send(self, data: bytes) -> None:
        self.writes.append(data)


def test_sends_of_one_loop_turn_leave_as_one_write_in_order() -> None:
    async def scenario() -> None:
        conn = FakeConnection()
        asyncssh_tuning.coalesce_sends(conn)
        for i in range(5):
            conn._send(bytes([i]) * 3)
        assert conn.writes == []  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        assert conn.writes == [b"\x00\x00\x00\x01\x01\x01\x02\x02\x02\x03\x03\x03\x04\x04\x04"]
        conn._send(b"next")
        await asyncio.sleep(0)
        assert conn.writes[-1] == b"next" and len(conn.writes) == 2

    asyncio.run(scenario())


def test_packet_logging_still_works_at_debug_level_3(caplog) -> None:
    asyncssh_tuning.install()

    class Logged(SSHPacketLogger):
        _handler_names = {94: "MSG_CHANNEL_DATA"}

        @property
        def logger(self) -> SSHLogger:
            return SSHLogger()

    previous = SSHLogger._debug_level
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            SSHLogger.set_debug_level(1)
            Logged().log_sent_packet(94, 1, b"payload")
            assert "MSG_CHANNEL_DATA" not in caplog.text
            SSHLogger.set_debug_level(3)
            Logged().log_sent_packet(94, 2, b"payload")
            assert "Sent MSG_CHANNEL_DATA (94), 7 bytes" in caplog.text
    finally:
        SSHLogger.set_debug_level(previous)


class SocketConnection:
    """The part of an asyncssh connection that coalesce_sends uses, on a real asyncio socket transport."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport: asyncio.Transport | None = transport
        self.joined_writes = 0
        self.handed: list[bytes] = []  # what went to asyncio's write

    def _send(self, data: bytes) -> None:
        if self._transport:  # as asyncssh: nothing once `_force_close` has forgotten the transport
            self.joined_writes += 1
            self.handed.append(bytes(data))
            self._transport.write(data)


def test_gathered_writes_keep_every_byte_in_order_when_the_socket_fills() -> None:
    async def scenario() -> tuple[bytes, bytes, list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        conn = SocketConnection(transport)
        asyncssh_tuning.coalesce_sends(conn)
        parts = [os.urandom(n) for n in (5, 32_768, 16, 70_000, 1, 4096)] * 20  # far more than the buffer
        for part in parts:
            conn._send(part)
        await asyncio.sleep(0)  # the turn ends: one flush
        handed_after_first_turn = list(conn.handed)
        theirs.setblocking(False)
        got = bytearray()
        want = b"".join(parts)
        while len(got) < len(want):
            try:
                got += theirs.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.01)
        transport.close()
        theirs.close()
        return bytes(got), want, handed_after_first_turn, parts

    got, want, handed, parts = asyncio.run(scenario())
    assert got == want
    # writev took what the socket could; the rest went to asyncio as the parts it was (the first one's
    # tail), never joined into a copy first
    assert handed and all(any(part.endswith(piece) for part in parts) for piece in handed)


def test_gathered_writes_go_out_without_asyncio_when_the_socket_takes_them() -> None:
    async def scenario() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        conn = SocketConnection(transport)
        asyncssh_tuning.coalesce_sends(conn)
        for part in (b"header", b"sealed packet", b"next"):
            conn._send(part)
        await asyncio.sleep(0)
        data = theirs.recv(100)
        transport.close()
        theirs.close()
        return data, conn.joined_writes

    assert asyncio.run(scenario()) == (b"headersealed packetnext", 0)


def test_a_transport_that_is_not_asyncio_s_socket_transport_gets_the_joined_bytes() -> None:
    """A jump host's channel answers get_extra_info("socket") with the outer connection's socket: writing
    there directly would put the inner connection's bytes on the outer one."""

    class ChannelTransport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.written: list[bytes] = []

        def get_extra_info(self, name: str) -> object:
            return self.sock if name == "socket" else None

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

        def write(self, data: bytes) -> None:
            self.written.append(data)

    async def scenario() -> tuple[list[bytes], bytes]:
        outer, peer = socket.socketpair()
        transport = ChannelTransport(outer)
        conn = SocketConnection(transport)  # type: ignore[arg-type]
        asyncssh_tuning.coalesce_sends(conn)
        conn._send(b"inner ")
        conn._send(b"packets")
        await asyncio.sleep(0)
        peer.setblocking(False)
        try:
            leaked = peer.recv(100)
        except BlockingIOError:
            leaked = b""
        outer.close()
        peer.close()
        return transport.written, leaked

    assert asyncio.run(scenario()) == ([b"inner packets"], b"")


def test_what_was_sent_before_asyncssh_forces_the_close_still_leaves() -> None:
    """asyncssh's disconnect() sends DISCONNECT, then `_force_close` forgets the transport and aborts it a
    turn later. Written at once (asyncssh's own way) the DISCONNECT left; gathered, it must leave too. What
    is sent after the abort goes nowhere, as with asyncssh."""

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        conn = SocketConnection(transport)
        asyncssh_tuning.coalesce_sends(conn)
        conn._send(b"last data, ")
        conn._send(b"DISCONNECT")
        conn._transport = None  # asyncssh's _force_close: forget it...
        loop.call_soon(transport.abort)  # ...and abort it on the next turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        conn._send(b"after the abort")  # (asyncssh's cleanup may still send: dropped)
        await asyncio.sleep(0)
        theirs.settimeout(5)
        got = b""
        while chunk := theirs.recv(100):
            got += chunk
        theirs.close()
        return got

    assert asyncio.run(scenario()) == b"last data, DISCONNECT"
