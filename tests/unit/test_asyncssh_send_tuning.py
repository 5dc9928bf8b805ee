"""The direct send path of x2ssh.ssh.tuning puts exactly asyncssh's bytes on the wire.

On a real connection to an asyncssh server (AES-GCM, strict kex), each packet is built twice from the same
state and the same padding bytes: once by asyncssh's path (with the IGNORE adjustment) and once by the
direct path; the wire bytes, the sequence number, the IV and the rekey count must match. Other ciphers and
a due rekey must take asyncssh's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import asyncssh
import asyncssh.connection as asyncssh_connection
import pytest
from asyncssh.constants import (
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_GLOBAL_REQUEST,
)
from asyncssh.packet import Boolean, String, UInt32

from tests.unit.test_asyncssh_channel_tuning import Recorder, lab
from x2ssh.ssh import tuning

tuning.install()  # as x2ssh runs (importing x2ssh.ssh.connect does the same)


class _CountingRandom:
    """`os` for asyncssh.connection with predictable padding, so two builds can be compared: a stream of
    counting bytes, so one call for several packets' padding gives what a call per packet gives."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.n = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def urandom(self, n: int) -> bytes:
        self.n += n
        return bytes((self.n - n + i) * 7 & 0xFF for i in range(n))


def _state(conn: Any) -> tuple[Any, ...]:
    return conn._send_seq, conn._send_encryption._cipher._iv, conn._rekey_bytes_sent


def _set_state(conn: Any, state: tuple[Any, ...]) -> None:
    conn._send_seq, conn._send_encryption._cipher._iv, conn._rekey_bytes_sent = state


def _build(conn: Any, send: Any, pkttype: int, args: tuple[bytes, ...]) -> tuple[bytes, tuple[Any, ...]]:
    sent: list[bytes] = []
    real_send, conn._send = conn._send, sent.append
    real_os, counting = asyncssh_connection.os, _CountingRandom(asyncssh_connection.os)
    asyncssh_connection.os = counting  # type: ignore[attr-defined]
    try:
        send(conn, pkttype, *args)
    finally:
        conn._send = real_send
        asyncssh_connection.os = real_os  # type: ignore[attr-defined]
    return b"".join(sent), _state(conn)


CASES = [
    (MSG_CHANNEL_DATA, (UInt32(7), String(b""))),
    (MSG_CHANNEL_DATA, (UInt32(7), String(b"x"))),
    *[(MSG_CHANNEL_DATA, (UInt32(3), String(bytes(range(256)) * (n // 256) + b"y" * (n % 256)))) for n in
      (1, 10, 11, 12, 13, 15, 16, 17, 100, 1000, 4095, 32768)],
    (MSG_CHANNEL_EOF, (UInt32(9),)),
    (MSG_CHANNEL_WINDOW_ADJUST, (UInt32(9), UInt32(123456))),
    (MSG_GLOBAL_REQUEST, (String(b"keepalive@openssh.com"), Boolean(True))),
]  # fmt: skip


def test_the_direct_path_builds_asyncssh_s_exact_bytes() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        conn = lab_["conn"]
        assert conn._strict_kex and isinstance(conn._send_encryption, tuning.GCMEncryption)
        start = _state(conn)
        results = []
        for pkttype, args in CASES:
            before = _state(conn)
            shipped = _build(conn, tuning._send_packet_without_cover, pkttype, args)
            _set_state(conn, before)
            direct = _build(conn, tuning._send_packet_fast, pkttype, args)
            results.append((shipped, direct))
        _set_state(conn, start)  # nothing was sent: the connection carries on from where it was
        chan, session = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"])
        chan.write(b"still in step")
        chan.write_eof()
        await asyncio.wait_for(session.closed, 10)
        results.append(session.events[0])
        return results

    results = asyncio.run(_in_lab(scenario))
    assert results.pop() == b"still in step"
    for (shipped, direct), (pkttype, _) in zip(results, CASES, strict=True):
        assert direct == shipped, f"packet type {pkttype}"
        assert (len(direct[0]) - 4 - 16) % 16 == 0  # length, whole cipher blocks, tag


@pytest.mark.parametrize("rekey_after", [None, 2])
def test_chunks_are_the_packets_of_send_channel_data_per_chunk(rekey_after: int | None) -> None:
    """send_channel_chunks gives the bytes, sequence number, IV and rekey count of send_channel_data called
    for each chunk in turn; with a rekey falling due after two packets, both hand the rest to asyncssh."""
    sizes = [1, 1000, 32768, 32768 * 3, 32768 * 8 + 5]

    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        conn = lab_["conn"]
        start = _state(conn)
        results = []
        for n in sizes:
            data = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
            before = _state(conn)
            if rekey_after is not None:
                conn._rekey_bytes = conn._rekey_bytes_sent + rekey_after * (32768 + 10)  # due after two
            per_chunk = _build_data(conn, _each_chunk, data)
            _set_state(conn, before)
            chunked = _build_data(conn, _chunks, data)
            _set_state(conn, before)
            read_into = _build_data(conn, _read_into, data)
            _set_state(conn, before)
            results.append((per_chunk, chunked, read_into))
        conn._rekey_bytes = 1 << 60
        _set_state(conn, start)
        return results

    def _each_chunk(conn: Any, data: bytes) -> None:
        for i in range(0, len(data), 32768):
            tuning.send_channel_data(conn, 5, data[i : i + 32768])

    def _chunks(conn: Any, data: bytes) -> None:
        tuning.send_channel_chunks(conn, 5, data, 32768)

    def _read_into(conn: Any, data: bytes) -> None:  # as a socket read into the buffers, then the send
        buffers = tuning.channel_read_buffers(conn, 32768, len(data))
        assert buffers is not None and sum(map(len, buffers)) == len(data)  # as far as the window goes
        at = 0
        for buffer in buffers:
            buffer[:] = data[at : at + len(buffer)]
            at += len(buffer)
        tuning.send_read_buffers(conn, 5, 32768, len(data))

    for n, (per_chunk, chunked, read_into) in zip(sizes, asyncio.run(_in_lab(scenario)), strict=True):
        assert chunked == per_chunk, n
        # (sealed from the read's slots, a packet's length field and body are one buffer: compare the bytes)
        assert (_wire(read_into[0]), *read_into[1:]) == (_wire(per_chunk[0]), *per_chunk[1:]), n
        parts = per_chunk[0]
        if rekey_after is not None and n > rekey_after * 32768:
            assert parts.index("KEXINIT") == 2 * rekey_after  # after two packets (length, sealed body each)
        else:
            assert "KEXINIT" not in parts and len(parts) == 2 * -(-n // 32768)


def _wire(parts: list[Any]) -> list[Any]:
    """The bytes sent, joined between the points where a rekey would start."""
    runs: list[Any] = [b""]
    for part in parts:
        if isinstance(part, str):
            runs += [part, b""]
        else:
            runs[-1] += part
    return runs


def _build_data(conn: Any, send: Any, data: bytes) -> tuple[Any, ...]:
    sent: list[Any] = []
    kexinit_sent = conn._kexinit_sent
    real_send, conn._send = conn._send, sent.append
    deferred = len(conn._deferred_packets)
    kexinit = conn._send_kexinit
    conn._send_kexinit = lambda: sent.append("KEXINIT")  # the point where the rekey would start
    real_os, counting = asyncssh_connection.os, _CountingRandom(asyncssh_connection.os)
    asyncssh_connection.os = counting  # type: ignore[attr-defined]
    try:
        send(conn, data)
    finally:
        conn._send = real_send
        conn._send_kexinit = kexinit
        conn._kexinit_sent = kexinit_sent
        asyncssh_connection.os = real_os  # type: ignore[attr-defined]
    later = conn._deferred_packets[deferred:]
    del conn._deferred_packets[deferred:]
    return [bytes(part) if not isinstance(part, str) else part for part in sent], later, _state(conn)


def test_other_ciphers_and_a_due_rekey_take_asyncssh_s_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = tuning._send_packet_without_cover

    def spy(conn: Any, pkttype: int, *args: bytes, **kw: Any) -> None:
        calls.append(pkttype)
        original(conn, pkttype, *args, **kw)

    monkeypatch.setattr(tuning, "_send_packet_without_cover", spy)

    async def chacha(lab_: dict[str, Any]) -> int:
        calls.clear()
        conn = lab_["conn"]
        chan, session = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"])
        chan.write(b"chacha")
        chan.write_eof()
        await asyncio.wait_for(session.closed, 10)
        return sum(1 for t in calls if t >= 80)

    assert asyncio.run(_in_lab(chacha, ("chacha20-poly1305@openssh.com",))) >= 3

    async def rekey_due(lab_: dict[str, Any]) -> tuple[int, bytes]:
        conn = lab_["conn"]
        conn._rekey_bytes_sent = conn._rekey_bytes  # a rekey falls due with the next packet
        calls.clear()
        chan, session = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"])
        chan.write(b"after a rekey")
        chan.write_eof()
        await asyncio.wait_for(session.closed, 10)
        return calls[0], session.events[0]

    first, echoed = asyncio.run(_in_lab(rekey_due))
    assert first >= 80 and echoed == b"after a rekey"  # asyncssh's path ran, started the rekey, went on


async def _in_lab(scenario: Any, ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com",)) -> Any:
    async with lab(ciphers) as lab_:
        return await scenario(lab_)


def test_packets_go_out_through_the_direct_path_when_installed() -> None:
    assert asyncssh.connection.SSHConnection.send_packet is tuning._send_packet_fast


class _GcmConnection:
    """The state of an established AES-GCM connection that the direct send path reads and updates."""

    def __init__(self, key: bytes, iv: bytes) -> None:
        from asyncssh.encryption import GCMEncryption

        self._send_encryption = GCMEncryption.new("aes128-gcm", key, iv)
        self._strict_kex = self._auth_complete = self._kex_complete = True
        self._compressor = None
        self._rekey_bytes_sent, self._rekey_bytes, self._rekey_seconds, self._rekey_time = 0, 1 << 40, 0, 0
        self._send_blocksize, self._send_enchdrlen, self._send_seq = 16, 4, 0
        self.writes: list[bytes] = []

    def _send(self, data: bytes) -> None:
        self.writes.append(bytes(data))


def test_a_write_s_packets_reach_the_coalesced_send_in_one_call() -> None:
    """With coalesce_sends, a write's sealed packets go to its pending list in one call (not two calls per
    packet), and the bytes, sequence number and IV are those of the per-part path."""
    key, iv = bytes(range(16)), bytes(range(12))
    data = bytes(range(256)) * 1024 + b"tail"  # eight full packets and a short one

    def build(coalesced: bool) -> tuple[bytes, int, bytes, int]:
        conn = _GcmConnection(key, iv)
        calls = []

        async def scenario() -> None:
            if coalesced:
                tuning.coalesce_sends(conn)
                many = conn._send.many  # type: ignore[attr-defined]

                def counting(parts: list[bytes], arena: Any = None) -> None:
                    calls.append(len(parts))
                    many(parts, arena)

                conn._send.many = counting  # type: ignore[attr-defined]
            tuning.send_channel_chunks(conn, 3, data, 32768)
            await asyncio.sleep(0)  # the turn ends: the coalesced parts go out

        real_os = asyncssh_connection.os
        asyncssh_connection.os = _CountingRandom(real_os)  # type: ignore[attr-defined]
        try:
            asyncio.run(scenario())
        finally:
            asyncssh_connection.os = real_os  # type: ignore[attr-defined]
        cipher = conn._send_encryption._cipher
        return b"".join(conn.writes), conn._send_seq, cipher._iv, len(calls) and calls[0]

    plain, coalesced = build(False), build(True)
    assert coalesced[:3] == plain[:3] and plain[1] == 9
    assert coalesced[3] == 2 * 9  # one call: a length and a sealed body per packet


def test_read_buffers_keep_to_the_window_and_stay_off_other_ciphers() -> None:
    conn = _GcmConnection(bytes(16), bytes(12))
    full = tuning.channel_read_buffers(conn, 32768, 1 << 30)
    assert full is not None and sum(map(len, full)) == tuning.READ_INTO_MAX  # one read at most
    assert [len(b) for b in tuning.channel_read_buffers(conn, 32768, 70_000) or []] == [32768, 32768, 4464]
    assert tuning.channel_read_buffers(conn, 32768, 0) is None  # no window: read into bytes, buffer there
    conn._rekey_bytes_sent = conn._rekey_bytes  # a rekey is due: asyncssh's path
    assert tuning.channel_read_buffers(conn, 32768, 1 << 20) is None


def test_the_direct_paths_step_the_iv_inline_as_asyncssh_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct send and receive paths step the GCM IV themselves (no `_update_iv` call per packet), to
    the IV asyncssh's own step gives (`_next_iv`, held to it here), so the connection stays in step."""
    from asyncssh.crypto.cipher import GCMCipher

    from tests.unit.test_tcp_channel_flow import _open

    for iv in (bytes(12), b"\x01\x02\x03\x04" + bytes(7) + b"\xfe", b"\xaa" * 4 + b"\xff" * 8):
        cipher = GCMCipher("aes128-gcm", bytes(16), iv)
        cipher._update_iv()
        assert tuning._next_iv(iv) == cipher._iv

    async def scenario(lab_: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        conn = lab_["conn"]
        ours = {id(conn._send_encryption._cipher), id(conn._recv_encryption._cipher)}
        steps: list[Any] = []  # by the client connection's ciphers (the lab's server is in this process)
        real = GCMCipher._update_iv

        def update_iv(self: GCMCipher) -> None:
            if id(self) in ours:
                steps.append(self)
            real(self)

        monkeypatch.setattr(GCMCipher, "_update_iv", update_iv)
        chan, session = await _open(conn, lab_["echo"])  # a TcpChannel: open, data, EOF, close both ways
        chan.write(b"in step" * 1000)
        chan.write_eof()
        await asyncio.wait_for(session.closed, 10)
        ours.clear()  # (the DISCONNECT as the lab closes takes asyncssh's path, as it should)
        return steps, session.events

    steps, events = asyncio.run(_in_lab(scenario))
    assert events[0] == b"in step" * 1000  # the server opened what was sealed, and the reverse
    assert steps == []


@pytest.mark.parametrize("seal_into", [True, False])
def test_packets_sealed_from_a_read_survive_the_next_read_and_a_full_socket(
    seal_into: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packets sealed from a read stay in the connection's slots until the coalesced send has written them.
    A second read on the same connection in the same loop turn (another channel) sends them first, and what
    the socket did not take is handed on as bytes: the next read reuses the slots, and a transport may keep
    what it is given. The bytes on the wire are those of sending each read's packets at once; also with a
    cryptography that cannot seal into a given buffer (new objects per packet, as before)."""
    monkeypatch.setattr(tuning, "_SEAL_INTO", seal_into and tuning._SEAL_INTO)
    key, iv = bytes(range(16)), bytes(range(12))
    reads = [(5, bytes(range(256)) * 640 + b"one"), (7, bytes(range(255, -1, -1)) * 512)]
    reads += [(5, b"three" * 9000), (5, b"four" * 10000), (5, b"five" * 2**17), (9, b"six" * 2000)]

    def read_into(conn: Any, chan: int, data: bytes) -> None:
        buffers = tuning.channel_read_buffers(conn, 32768, 1 << 30)
        assert buffers is not None
        at = 0
        for buffer in buffers:
            piece = data[at : at + len(buffer)]
            buffer[: len(piece)] = piece
            at += len(piece)
        tuning.send_read_buffers(conn, chan, 32768, len(data))

    def expected() -> bytes:
        conn = _GcmConnection(key, iv)  # the packets of each read's bytes, sent as a write
        for chan, data in reads:
            tuning.send_channel_chunks(conn, chan, data, 32768)
        return b"".join(conn.writes)

    async def coalesced(size: int) -> tuple[bytes, list[Any]]:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # the socket takes only part of a read
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        conn = _GcmConnection(key, iv)
        handed: list[Any] = []

        def send(data: Any) -> None:  # asyncssh's own send: the transport's write
            handed.append(data)
            transport.write(data)

        conn._send, conn._transport = send, transport  # type: ignore[method-assign]
        tuning.coalesce_sends(conn)
        for chan, data in reads:  # all in one loop turn
            read_into(conn, chan, data)
        wire = bytearray()
        for _ in range(100_000):  # the loop's turns write the rest as the reader makes room
            if len(wire) >= size:
                break
            await asyncio.sleep(0)
            with contextlib.suppress(BlockingIOError):
                wire += theirs.recv(1 << 20)
        transport.close()
        theirs.close()
        return bytes(wire), handed

    real_os = asyncssh_connection.os
    asyncssh_connection.os = _CountingRandom(real_os)  # type: ignore[attr-defined]
    try:
        want = expected()
        asyncssh_connection.os = _CountingRandom(real_os)  # type: ignore[attr-defined]
        wire, handed = asyncio.run(coalesced(len(want)))
    finally:
        asyncssh_connection.os = real_os  # type: ignore[attr-defined]
    assert handed, "the socket took everything: the case under test did not happen"
    assert all(type(part) is bytes or type(part.obj) is bytes for part in handed)  # nothing of the slots
    assert wire == want
