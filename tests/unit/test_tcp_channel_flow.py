"""TcpChannel's flow control, half-close and protocol checks.

Against a real asyncssh server in this process (the lab of test_asyncssh_channel_tuning), once with x2ssh's
asyncssh tuning (DATA through the direct AES-GCM paths) and once without (asyncssh's own send and receive):
more than a window of bytes both ways, a paused reader that closes the SSH window and gets everything on
resume, the write buffer pausing and resuming the writer, bytes and EOF and CLOSE that arrive while paused
delivered in order on resume. The packet-level rules (window exceeded, extended data, requests, responses)
are checked by feeding packets to a channel on a recording connection.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_SUCCESS,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from asyncssh.misc import ProtocolError
from asyncssh.packet import Boolean, SSHPacket, String, UInt32

from tests.unit.test_asyncssh_channel_tuning import Recorder, lab, tuned
from x2ssh.ssh.tcp_channel import TcpChannel, open_tcp_channel

WINDOW = 256 * 1024  # small, so a few hundred KiB already need window adjusts
PKT = 32 * 1024


@pytest.fixture(params=[True, False], ids=["tuned", "asyncssh"])
def tuning_on(request: pytest.FixtureRequest) -> Iterator[bool]:
    with tuned(request.param):
        yield request.param


class FlowRecorder(Recorder):
    """A Recorder that also notes pause_writing/resume_writing."""

    def __init__(self, paused: bool = False) -> None:
        super().__init__()
        self.writing: list[str] = []
        self.paused = paused

    def connection_made(self, chan: Any) -> None:
        if self.paused:  # before any byte can arrive
            chan.pause_reading()

    def pause_writing(self) -> None:
        self.writing.append("pause")

    def resume_writing(self) -> None:
        self.writing.append("resume")


async def _open(
    conn: Any, port: int, window: int = WINDOW, paused: bool = False
) -> tuple[TcpChannel, FlowRecorder]:
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    session = FlowRecorder(paused)

    def on_done(chan: Any, exc: BaseException | None) -> None:
        done.set_result(chan) if exc is None else done.set_exception(exc)

    open_tcp_channel(conn, lambda: session, "127.0.0.1", port, "", 0, on_done, window=window, max_pktsize=PKT)
    return await asyncio.wait_for(done, 10), session


def _run(scenario: Any) -> Any:
    async def main() -> Any:
        async with lab() as lab_:
            return await scenario(lab_)

    return asyncio.run(main())


async def _until(predicate: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _settle(session: FlowRecorder) -> int:
    """Wait until no more bytes arrive; the number received."""
    last = -1
    while True:
        got = len(session.events[0]) if session.events and isinstance(session.events[0], bytes) else 0
        if got == last:
            return got
        last = got
        await asyncio.sleep(0.2)


def test_more_than_a_window_both_ways_byte_exact(tuning_on: bool) -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        chan, session = await _open(lab_["conn"], lab_["echo"])
        payload = os.urandom(3 * 1024 * 1024 + 17)  # a dozen windows, packets of every size
        for at in range(0, len(payload), 100_000):
            chan.write(payload[at : at + 100_000])
        chan.write_eof()
        await asyncio.wait_for(session.closed, 30)
        assert session.events[0] == payload
        return session.events[1:]

    assert _run(scenario) == ["eof", ("lost", None)]


def test_a_rekey_in_the_middle_of_a_transfer_loses_and_reorders_nothing(tuning_on: bool) -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[bool, list[Any]]:
        conn = lab_["conn"]
        chan, session = await _open(conn, lab_["echo"])
        old_cipher = conn._send_encryption._cipher
        payload = os.urandom(1024 * 1024)
        for at in range(0, len(payload), 64 * 1024):
            if at == 512 * 1024:
                conn._rekey_bytes_sent = conn._rekey_bytes  # the next packet starts a key exchange
            chan.write(payload[at : at + 64 * 1024])
            await asyncio.sleep(0)  # DATA sent during the exchange waits in asyncssh's deferred queue
        chan.write_eof()
        await asyncio.wait_for(session.closed, 30)
        assert session.events[0] == payload
        return conn._send_encryption._cipher is not old_cipher, session.events[1:]

    rekeyed, rest = _run(scenario)
    assert rekeyed
    assert rest == ["eof", ("lost", None)]


def test_a_paused_reader_stops_the_server_and_gets_everything_on_resume(tuning_on: bool) -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[int, list[str], list[Any]]:
        chan, session = await _open(lab_["conn"], lab_["echo"])
        chan.pause_reading()
        block = os.urandom(1024 * 1024)
        sent = 0
        while chan.get_write_buffer_size() == 0:  # until the echo stalls and our own window runs out
            assert sent < 64, "the server never stopped taking bytes"
            chan.write(block)
            sent += 1
            await asyncio.sleep(0.05)
        payload = block * sent
        chan.write_eof()
        while_paused = await _settle(session)
        chan.resume_reading()
        await asyncio.wait_for(session.closed, 30)
        assert session.events[0] == payload
        return while_paused, session.writing, session.events[1:]

    while_paused, writing, rest = _run(scenario)
    assert while_paused == 0  # nothing delivered while paused
    assert writing == ["pause", "resume"]  # the buffer passed the high water, then drained
    assert rest == ["eof", ("lost", None)]


def test_bytes_eof_and_close_that_came_while_paused_arrive_in_order(tuning_on: bool) -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        chan, session = await _open(lab_["conn"], lab_["first"], paused=True)
        chan.write_eof()  # the server then closes: its bytes, EOF and CLOSE all come while we are paused
        await asyncio.sleep(0.5)
        assert session.events == []
        chan.resume_reading()
        await asyncio.wait_for(session.closed, 10)
        return session.events

    assert _run(scenario) == [b"hello from the server", "eof", ("lost", None)]


def test_writes_after_close_are_refused_and_the_channel_leaves_the_table(tuning_on: bool) -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[list[Any], int]:
        chan, session = await _open(lab_["conn"], lab_["echo"])
        chan.write(b"x" * 1000)
        chan.close()
        assert chan.is_closing()
        with pytest.raises(BrokenPipeError):
            chan.write(b"late")
        await asyncio.wait_for(session.closed, 10)
        return session.events, len(lab_["conn"]._channels)

    events, left = _run(scenario)
    assert events[-1] == ("lost", None)
    assert left == 0


def test_abort_drops_the_buffer_and_closes_at_once(tuning_on: bool) -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        chan, session = await _open(lab_["conn"], lab_["echo"], window=WINDOW)
        chan.pause_reading()
        chan.write(os.urandom(4 * WINDOW))  # more than the server's window: some stays buffered
        chan.abort()
        assert chan.get_write_buffer_size() == 0
        await asyncio.wait_for(session.closed, 10)
        return session.events

    assert _run(scenario) == [("lost", None)]


# -- packet level: a channel on a connection that records what is sent --


class RecordingConn:
    """What TcpChannel uses of an asyncssh connection; sent packets are recorded as (type, payload)."""

    def __init__(self) -> None:
        self._channels: dict[int, Any] = {}
        self.sent: list[tuple[int, bytes]] = []
        self.logger = asyncssh.logging.logger

    def add_channel(self, chan: Any) -> int:
        self._channels[7] = chan
        return 7

    _max_recv_pktlen = 0

    def _update_recv_pktlen(self, size: int) -> None:
        pass

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        self.sent.append((pkttype, b"".join(args)))

    # what tuning.send_channel_data looks at: no cipher, so asyncssh's path (send_packet above)
    _send_encryption = None


def _packet(*parts: bytes) -> SSHPacket:
    return SSHPacket(b"".join(parts))


@pytest.fixture
def opened() -> Iterator[tuple[TcpChannel, RecordingConn, FlowRecorder]]:
    async def make() -> Any:
        conn = RecordingConn()
        session = FlowRecorder()
        results: list[Any] = []
        chan = open_tcp_channel(
            conn, lambda: session, "192.0.2.1", 80, "", 0, lambda c, e: results.append((c, e)),  # type: ignore[arg-type]
            window=1000, max_pktsize=PKT,
        )  # fmt: skip
        chan.process_open_confirmation(99, 100, 40, _packet())
        assert results == [(chan, None)]
        conn.sent.clear()
        return chan, conn, session

    yield asyncio.run(make())


def test_data_beyond_the_receive_window_is_a_protocol_error(opened: Any) -> None:
    chan, _, session = opened
    chan.pause_reading()  # so the window is not topped up
    chan.process_packet(MSG_CHANNEL_DATA, 0, _packet(String(b"a" * 600)))
    with pytest.raises(ProtocolError, match="Window exceeded"):
        chan.process_packet(MSG_CHANNEL_DATA, 0, _packet(String(b"b" * 401)))
    chan.resume_reading()
    assert session.events == [b"a" * 600]


def test_the_window_is_topped_up_once_half_is_used(opened: Any) -> None:
    chan, conn, session = opened
    chan.process_packet(MSG_CHANNEL_DATA, 0, _packet(String(b"a" * 400)))
    assert conn.sent == []  # 600 left: not below half
    chan.process_packet(MSG_CHANNEL_DATA, 0, _packet(String(b"b" * 210)))
    assert conn.sent == [(MSG_CHANNEL_WINDOW_ADJUST, UInt32(99) + UInt32(610))]
    chan.pause_reading()
    chan.process_packet(MSG_CHANNEL_DATA, 0, _packet(String(b"c" * 1000)))  # the whole window, not delivered
    assert conn.sent[1:] == []  # paused: no adjust, so the server must stop
    assert session.events == [b"a" * 400 + b"b" * 210]
    chan.resume_reading()
    assert conn.sent[1:] == [(MSG_CHANNEL_WINDOW_ADJUST, UInt32(99) + UInt32(1000))]
    assert session.events == [b"a" * 400 + b"b" * 210 + b"c" * 1000]


def test_writes_keep_to_the_send_window_and_packet_size(opened: Any) -> None:
    chan, conn, _ = opened
    chan.write(b"x" * 150)  # window 100, packets of at most 40
    assert [len(p) - 8 for t, p in conn.sent if t == MSG_CHANNEL_DATA] == [40, 40, 20]
    assert chan.get_write_buffer_size() == 50
    chan.write_eof()
    assert all(t == MSG_CHANNEL_DATA for t, _ in conn.sent)  # the EOF waits for the buffered bytes
    chan.process_packet(MSG_CHANNEL_WINDOW_ADJUST, 0, _packet(UInt32(1000)))
    assert [len(p) - 8 for t, p in conn.sent if t == MSG_CHANNEL_DATA] == [40, 40, 20, 40, 10]
    assert conn.sent[-1] == (MSG_CHANNEL_EOF, UInt32(99))
    assert b"".join(p[8:] for t, p in conn.sent if t == MSG_CHANNEL_DATA) == b"x" * 150


def test_extended_data_and_unasked_responses_are_protocol_errors(opened: Any) -> None:
    chan, _, _ = opened
    with pytest.raises(ProtocolError):
        chan.process_packet(MSG_CHANNEL_EXTENDED_DATA, 0, _packet(UInt32(1), String(b"err")))
    for pkttype in (MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE):
        with pytest.raises(ProtocolError):
            chan.process_packet(pkttype, 0, _packet())


def test_a_request_that_wants_a_reply_gets_failure(opened: Any) -> None:
    chan, conn, _ = opened
    chan.process_packet(MSG_CHANNEL_REQUEST, 0, _packet(String(b"keepalive@openssh.com"), Boolean(True)))
    chan.process_packet(MSG_CHANNEL_REQUEST, 0, _packet(String(b"eow@openssh.com"), Boolean(False)))
    assert conn.sent == [(MSG_CHANNEL_FAILURE, UInt32(99))]


def test_the_server_s_close_is_answered_and_the_session_told_once(opened: Any) -> None:
    chan, conn, session = opened
    chan.write(b"x" * 500)  # 400 of it buffered: dropped, as the server closed
    chan.process_packet(MSG_CHANNEL_EOF, 0, _packet())
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, _packet())
    assert conn.sent[-1] == (MSG_CHANNEL_CLOSE, UInt32(99))
    assert session.events == ["eof", ("lost", None)]
    assert conn._channels == {}
    chan.close()
    chan.abort()
    assert [t for t, _ in conn.sent].count(MSG_CHANNEL_CLOSE) == 1
    assert session.events == ["eof", ("lost", None)]


def test_close_with_nothing_buffered_sends_close_at_once_and_ends_on_the_server_s(opened: Any) -> None:
    chan, conn, session = opened
    chan.close()
    assert conn.sent == [(MSG_CHANNEL_CLOSE, UInt32(99))]
    assert chan.is_closing() and session.events == []  # the channel ends with the server's CLOSE
    chan.close()
    assert len(conn.sent) == 1
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, _packet())
    assert conn.sent == [(MSG_CHANNEL_CLOSE, UInt32(99))]
    assert session.events == [("lost", None)]
    assert conn._channels == {}


def test_close_sends_close_after_the_buffered_bytes(opened: Any) -> None:
    chan, conn, session = opened
    chan.write(b"x" * 150)  # window 100: 50 buffered
    chan.close()
    assert all(t == MSG_CHANNEL_DATA for t, _ in conn.sent)
    chan.process_packet(MSG_CHANNEL_WINDOW_ADJUST, 0, _packet(UInt32(1000)))
    assert conn.sent[-1] == (MSG_CHANNEL_CLOSE, UInt32(99))
    assert b"".join(p[8:] for t, p in conn.sent if t == MSG_CHANNEL_DATA) == b"x" * 150
    assert session.events == []


def test_close_after_the_server_s_close_waited_behind_paused_bytes_ends_the_channel(opened: Any) -> None:
    chan, conn, session = opened
    chan.pause_reading()
    chan.process_packet(MSG_CHANNEL_DATA, 0, _packet(String(b"a" * 10)))
    chan.process_packet(MSG_CHANNEL_CLOSE, 0, _packet())
    assert session.events == []  # held behind the paused bytes
    chan.close()  # the session gives up: the held bytes are dropped, the channel ends
    assert session.events == [("lost", None)]
    assert [t for t, _ in conn.sent].count(MSG_CHANNEL_CLOSE) == 1
    assert conn._channels == {}


def test_a_lost_connection_fails_an_open_and_ends_an_open_channel() -> None:
    asyncio.run(_lost_connection())


async def _lost_connection() -> None:
    conn = RecordingConn()
    results: list[Any] = []
    pending = open_tcp_channel(
        conn, FlowRecorder, "192.0.2.1", 80, "", 0, lambda c, e: results.append(e),  # type: ignore[arg-type]
        window=1000, max_pktsize=PKT,
    )  # fmt: skip
    pending.process_connection_close(ConnectionResetError())
    assert [type(e) for e in results] == [asyncssh.ChannelOpenError]
    assert conn._channels == {}

    session = FlowRecorder()
    chan = open_tcp_channel(
        conn, lambda: session, "192.0.2.1", 80, "", 0, lambda c, e: None,  # type: ignore[arg-type]
        window=1000, max_pktsize=PKT,
    )  # fmt: skip
    chan.process_open_confirmation(5, 100, 40, _packet())
    chan.process_connection_close(ConnectionResetError())
    assert session.events == [("lost", "ConnectionResetError")]
    assert chan.is_closing()
    assert conn._channels == {}


def test_long_payloads_reach_the_session_as_views_of_their_packet_short_ones_as_bytes() -> None:
    """With the tuning on, a long DATA payload is handed over without a copy (a read-only view of the
    opened packet), a short one as bytes; either way the bytes are the server's, in order."""
    kinds: list[tuple[type, int]] = []

    async def scenario(lab_: dict[str, Any]) -> Any:
        chan, session = await _open(lab_["conn"], lab_["echo"])
        record = session.data_received

        def data_received(data: Any, datatype: Any) -> None:
            kinds.append((type(data), len(data)))
            record(data, datatype)

        session.data_received = data_received  # type: ignore[method-assign]
        chan.write(b"short")
        await _until(lambda: bool(kinds))
        payload = os.urandom(100_000)
        chan.write(payload)
        chan.write_eof()
        await asyncio.wait_for(session.closed, 30)
        return session.events[0] == b"short" + payload

    with tuned(True):
        assert _run(scenario)
    assert kinds[0] == (bytes, 5)
    assert (memoryview, PKT) in kinds, kinds  # a full packet's payload, not copied
