"""A `direct-tcpip` channel on an asyncssh connection, without asyncssh's general-purpose channel object.

asyncssh's `SSHTCPChannel` serves every kind of channel: encodings, extended data, requests and their
waiters, environment, X11, a child logger and an `asyncio.Event` per channel, a task to start reading, and a
chain of calls per data packet. A forwarded TCP flow needs none of that, and x2ssh opens one per connection
the user makes: that overhead was a good part of x2ssh's CPU per short connection. `TcpChannel` speaks
the same channel protocol (RFC 4254 §5, the same packets asyncssh sends) with only what a TCP flow uses:

- open by callback (`open_tcp_channel`): no task, future or coroutine per flow;
- data both ways with SSH flow control: the send window and packet size from the server, a receive window
  that is topped up as the session takes the bytes, and `pause_reading` closing it;
- write buffer limits with `pause_writing`/`resume_writing` to the session, as asyncio transports do;
- EOF and CLOSE with asyncssh's semantics (EOF and CLOSE wait for buffered bytes; abort does not);
- the session interface of `asyncssh.SSHTCPSession` (`connection_made`, `data_received(data, None)`,
  `eof_received`, `connection_lost`, `pause_writing`, `resume_writing`), so sessions work unchanged.

A pool counts its channels through the channel itself: given an `account` (its connection's counters),
the channel adds itself when it is created and when it is confirmed and takes itself off when it is
released, so no wrapper per flow is needed. A `refused` hook may take a refused open over (the pool
retries it on another connection); the caller's `on_done` then comes from there, and `cancel()` follows.

The connection routes packets to it as to any channel (it sits in the connection's channel table, and
asyncssh calls `process_packet`, `process_open_confirmation`, `process_open_failure` and
`process_connection_close` on it). With the AES-GCM fast path of `x2ssh.ssh.tuning`, a DATA packet's
payload comes straight to `receive_data`, a well-formed window adjust, confirmation, EOF and CLOSE straight
to `receive_window_adjust`, `receive_open_confirmation`, `receive_eof` and `receive_close` (the same checks
as the `process_*` path, which parses the packet and then calls them); an outgoing packet is sealed straight
from the caller's bytes.
Other ciphers, a rekey in progress and packet debugging go through asyncssh's own send and receive.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import asyncssh
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_SUCCESS,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from asyncssh.misc import ProtocolError
from asyncssh.packet import SSHPacket, SSHPacketLogger, String, UInt32

from x2ssh.ssh import tuning

log = logging.getLogger(__name__)

OpenDone = Callable[[Any, BaseException | None], None]


class ChannelAccount(Protocol):
    """Counters a channel keeps up to date itself (a pool member's): no wrapper per channel."""

    channels: int  # opening or open: added when the channel is created, taken off when it is released
    established: int  # open: added on the confirmation, taken off when the channel is released


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class OpenRequest(NamedTuple):
    """What a channel was opened with: enough to open the same channel elsewhere."""

    session_factory: Callable[[], Any]
    host: str
    port: int
    orig_host: str
    orig_port: int
    on_done: OpenDone
    window: int
    max_pktsize: int


# Called on a refused open (inside the packet handling): returns the open that takes over, or None.
OpenRefused = Callable[["TcpChannel", asyncssh.ChannelOpenError], Cancellable | None]

HIGH_WATER = 64 * 1024  # asyncssh's default write buffer limits
LOW_WATER = HIGH_WATER // 4
_DIRECT_TCPIP = String(b"direct-tcpip")
_OPEN_HEAD = struct.Struct(">IIII").pack  # our channel, window, packet size, host length
_PORT_AND_LEN = struct.Struct(">II").pack  # the port, the originator's length
_PORT = struct.Struct(">I").pack

# Send and receive states (asyncssh's names): a channel is "opening" until the server answers.
_OPENING, _OPEN, _EOF_PENDING, _EOF, _CLOSE_PENDING, _CLOSED = range(6)


class TcpChannel(SSHPacketLogger, tuning.DirectDataHandler):
    """One `direct-tcpip` channel; also the handle of its open in flight (`cancel()`)."""

    __slots__ = (
        "_account", "_cancelled", "_conn", "_factory", "_init_window", "_max_pktsize", "_moved",
        "_on_done", "_peers", "_recv_buf", "_recv_chan", "_recv_paused", "_recv_state", "_recv_window",
        "_refused", "_send_buf", "_send_buf_len", "_send_chan", "_send_paused", "_send_pktsize",
        "_send_state", "_send_window", "_session",
    )  # fmt: skip

    def __init__(
        self, conn: asyncssh.SSHClientConnection, factory: Callable[[], Any], on_done: OpenDone,
        window: int, max_pktsize: int, account: ChannelAccount | None = None,
        refused: OpenRefused | None = None,
    ) -> None:  # fmt: skip
        self._conn: Any = conn
        self._factory: Callable[[], Any] | None = factory  # until the confirmation
        self._on_done: OpenDone | None = on_done
        self._cancelled = False
        self._session: Any = None
        self._peers: tuple[str, int, str, int] = ("", 0, "", 0)  # host, port, orig_host, orig_port
        self._account = account
        self._refused = refused
        self._moved: Cancellable | None = None  # the open that took over after a refusal
        self._send_state = _OPENING
        self._send_chan = 0
        self._send_window = 0
        self._send_pktsize = 0
        self._send_buf: deque[memoryview] = deque()
        self._send_buf_len = 0
        self._send_paused = False
        self._recv_state = _OPENING
        self._init_window = window
        self._recv_window = window
        self._recv_paused = False
        self._recv_buf: deque[bytes | None] = deque()  # None: the EOF, after the bytes before it
        self._max_pktsize = max_pktsize
        if conn._max_recv_pktlen < max_pktsize + 1024:  # (the same test as asyncssh's, without the call)
            conn._update_recv_pktlen(max_pktsize)
        self._recv_chan: int | None = conn.add_channel(self)  # type: ignore[arg-type]  # any packet handler
        if account is not None:
            account.channels += 1

    # -- what asyncssh's connection and logging use --

    @property
    def logger(self) -> Any:
        return self._conn.logger if self._conn is not None else asyncssh.logging.logger

    def process_packet(self, pkttype: int, seq: int, packet: SSHPacket) -> bool:
        handler = _HANDLERS.get(pkttype)
        if handler is None:
            return False  # asyncssh then reports an unexpected packet
        handler(self, packet)
        return True

    def process_open_confirmation(
        self, send_chan: int, send_window: int, send_pktsize: int, packet: SSHPacket
    ) -> None:
        if self._send_state != _OPENING:
            raise ProtocolError("Channel not being opened")
        packet.check_end()  # direct-tcpip confirmations carry nothing else
        self.receive_open_confirmation(send_chan, send_window, send_pktsize)

    def receive_open_confirmation(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        """The server's confirmation, checked (the fast path of `x2ssh.ssh.tuning` calls this directly)."""
        if self._send_state != _OPENING:
            raise ProtocolError("Channel not being opened")
        self._send_chan = send_chan
        self._send_window = send_window
        self._send_pktsize = send_pktsize
        self._send_state = self._recv_state = _OPEN
        if self._account is not None:
            self._account.established += 1
        # Let go of the factory: it is often the session's bound method, and a cycle through it would
        # leave this channel and its session to the cyclic garbage collector instead of refcounting.
        factory, self._factory = self._factory, None
        if self._cancelled:  # nobody wants this channel any more
            self._on_done = None
            self.close()
            return
        try:
            session = factory()  # type: ignore[misc]  # set until now: the open is answered once
            self._session = session
            session.connection_made(self)
        except Exception as exc:  # a failing session: this channel only
            self._session = None
            self.abort()
            self._report(None, exc)
            return
        on_done, self._on_done = self._on_done, None  # `_report(self, None)`, without the call per flow
        if on_done is not None:
            try:
                on_done(self, None)
            except Exception as err:
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "channel open callback failed", "exception": err, "channel": self}
                )

    def process_open_failure(self, code: int, reason: str, lang: str) -> None:
        if self._send_state != _OPENING:
            raise ProtocolError("Channel not being opened")
        self._send_state = self._recv_state = _CLOSED
        self._release()
        if self._cancelled:
            return
        exc = asyncssh.ChannelOpenError(code, reason, lang)
        if self._refused is not None:
            try:
                self._moved = self._refused(self, exc)
            except Exception as err:  # as `_report`: this channel only, never the SSH connection
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "channel refusal hook failed", "exception": err, "channel": self}
                )
            if self._moved is not None:
                self._on_done = None  # the open that took over answers the caller
                return
        self._report(None, exc)

    def process_connection_close(self, exc: Exception | None) -> None:
        opening = self._send_state == _OPENING
        self._send_state = self._recv_state = _CLOSED
        self._send_buf.clear()
        self._send_buf_len = 0
        self._recv_buf.clear()
        if opening:
            self._release()
            if not self._cancelled:
                lost = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
                self._report(None, lost)
            return
        self._finish(exc)

    # -- the opener's side --

    def start_open(self, host: str, port: int, orig_host: str, orig_port: int) -> None:
        """Send CHANNEL_OPEN direct-tcpip; the outcome reaches `on_done`."""
        self._peers = (host, port, orig_host, orig_port)
        to, by = host.encode(), orig_host.encode()  # what asyncssh's String() does, packed in three calls
        self._conn.send_packet(
            MSG_CHANNEL_OPEN, _DIRECT_TCPIP,
            _OPEN_HEAD(self._recv_chan, self._init_window, self._max_pktsize, len(to)), to,
            _PORT_AND_LEN(port, len(by)), by, _PORT(orig_port), handler=self,
        )  # fmt: skip

    def cancel(self) -> None:
        """Give up on the open: no `on_done` any more; a confirmation that still comes closes the channel."""
        self._cancelled = True
        if self._moved is not None:
            self._moved.cancel()

    @property
    def account(self) -> ChannelAccount | None:
        """The counters this channel keeps (None: uncounted)."""
        return self._account

    def open_request(self) -> OpenRequest:
        """The arguments of this channel's open, with the caller's `on_done` (for a retry elsewhere)."""
        host, port, orig_host, orig_port = self._peers
        assert self._on_done is not None and self._factory is not None, "the open was already answered"
        on_done, window, max_pktsize = self._on_done, self._init_window, self._max_pktsize
        return OpenRequest(self._factory, host, port, orig_host, orig_port, on_done, window, max_pktsize)

    def _report(self, chan: TcpChannel | None, exc: BaseException | None) -> None:
        # Runs inside asyncssh's packet handling: an error here must not end the SSH connection.
        on_done, self._on_done = self._on_done, None
        if on_done is None:
            return
        try:
            on_done(chan, exc)
        except Exception as err:
            asyncio.get_running_loop().call_exception_handler(
                {"message": "channel open callback failed", "exception": err, "channel": self}
            )

    # -- the session's side: an asyncio-transport-like channel --

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """`local_peername`, `remote_peername`, else the connection's extra info."""
        if name == "local_peername":
            return self._peers[2:]
        if name == "remote_peername":
            return self._peers[:2]
        if name == "connection":
            return self._conn
        return self._conn.get_extra_info(name, default) if self._conn is not None else default

    def get_write_buffer_size(self) -> int:
        return self._send_buf_len

    def is_closing(self) -> bool:
        return self._send_state != _OPEN

    def write(self, data: bytes) -> None:
        """Send `data` as the window allows; the rest is buffered (`pause_writing` past the high water)."""
        if self._send_state != _OPEN:
            raise BrokenPipeError("Channel not open for sending")
        n = len(data)
        if not n:
            return
        if not self._send_buf and n <= self._send_window:
            self._send_window -= n
            if n <= self._send_pktsize:
                tuning.send_channel_data(self._conn, self._send_chan, data)
            else:
                tuning.send_channel_chunks(self._conn, self._send_chan, data, self._send_pktsize)
            return
        self._send_buf.append(memoryview(data))
        self._send_buf_len += n
        self._flush_send()

    def read_buffers(self) -> list[memoryview] | None:
        """Buffers a socket read may fill that go straight into this channel's next packets (as far as the
        window goes), or None: read into bytes and `write` them. `sent_read_buffers` must follow at once."""
        if self._send_state != _OPEN or self._send_buf:
            return None
        return tuning.channel_read_buffers(self._conn, self._send_pktsize, self._send_window)

    def sent_read_buffers(self, n: int) -> None:
        """Send the `n` bytes a socket read put into the buffers of `read_buffers`."""
        self._send_window -= n
        tuning.send_read_buffers(self._conn, self._send_chan, self._send_pktsize, n)

    def write_eof(self) -> None:
        """Send EOF after the buffered bytes."""
        if self._send_state == _OPEN:
            self._send_state = _EOF_PENDING
            self._flush_send()

    def close(self) -> None:
        """Send CLOSE after the buffered bytes; bytes still coming in are dropped."""
        if self._send_state == _OPENING:
            return  # not ours yet: `cancel()` gives up an open (the connection closing reports it failed)
        if self._send_state not in (_CLOSE_PENDING, _CLOSED):
            if self._send_buf:
                self._send_state = _CLOSE_PENDING
                self._flush_send()
            else:  # nothing to wait for (nor paused): `_close_send()`, without three calls per flow
                self._conn.send_packet(MSG_CHANNEL_CLOSE, _PORT(self._send_chan), handler=self)
                self._send_state = _CLOSED
        self._recv_buf.clear()  # `_discard_recv()`, inline for the same reason
        self._recv_paused = False
        if self._recv_state == _CLOSE_PENDING:
            self._recv_state = _CLOSED
            self._finish(None)

    def abort(self) -> None:
        """CLOSE at once; buffered bytes both ways are dropped."""
        if self._send_state == _OPENING:
            return  # as `close()`
        self._close_send()
        self._discard_recv()

    def pause_reading(self) -> None:
        """Stop delivering data; the receive window is no longer topped up, so the server stops too."""
        self._recv_paused = True

    def resume_reading(self) -> None:
        if self._recv_paused:
            self._recv_paused = False
            self._flush_recv()

    # -- sending --

    def _flush_send(self) -> None:
        buf = self._send_buf
        conn, chan = self._conn, self._send_chan
        while buf and self._send_window:
            size = self._send_window  # in packets of at most the packet size, as far as the window goes
            head = buf[0]
            if len(head) > size:
                chunk = head[:size]
                buf[0] = head[size:]
            else:
                chunk = buf.popleft()
            n = len(chunk)
            self._send_buf_len -= n
            self._send_window -= n
            tuning.send_channel_chunks(conn, chan, chunk, self._send_pktsize)
        session = self._session
        if self._send_paused:
            if self._send_buf_len <= LOW_WATER:
                self._send_paused = False
                if session is not None:
                    session.resume_writing()
        elif self._send_buf_len > HIGH_WATER:
            self._send_paused = True
            if session is not None:
                session.pause_writing()
        if not buf:
            if self._send_state == _EOF_PENDING:
                self._send_state = _EOF
                self._send(MSG_CHANNEL_EOF)
            elif self._send_state == _CLOSE_PENDING:
                self._close_send()

    def _send(self, pkttype: int, *args: bytes) -> None:
        self._conn.send_packet(pkttype, UInt32(self._send_chan), *args, handler=self)

    def _close_send(self) -> None:
        """CLOSE now (once); unsent bytes are dropped. The channel ends when the server's CLOSE is taken."""
        self._send_buf.clear()
        self._send_buf_len = 0
        if self._send_state not in (_CLOSED, _OPENING):
            self._send(MSG_CHANNEL_CLOSE)
        self._send_state = _CLOSED

    # -- receiving --

    def receive_data(self, data: bytes) -> None:
        """A DATA packet's payload (the fast path of `x2ssh.ssh.tuning` calls this directly)."""
        if self._recv_state != _OPEN:
            raise ProtocolError("Channel not open for sending")
        n = len(data)
        if n > self._recv_window:
            raise ProtocolError("Window exceeded")
        if not n or self._send_state in (_CLOSE_PENDING, _CLOSED):
            return  # asyncssh drops what comes after the session closed the channel
        self._recv_window -= n
        if self._recv_paused or self._recv_buf:
            self._recv_buf.append(data)
            return
        if self._recv_window < self._init_window // 2:  # `_deliver(data)`, without the call per packet
            self._send(MSG_CHANNEL_WINDOW_ADJUST, UInt32(self._init_window - self._recv_window))
            self._recv_window = self._init_window
        self._session.data_received(data, None)

    def _deliver(self, data: bytes) -> None:
        if self._recv_window < self._init_window // 2:
            self._send(MSG_CHANNEL_WINDOW_ADJUST, UInt32(self._init_window - self._recv_window))
            self._recv_window = self._init_window
        self._session.data_received(data, None)

    def _flush_recv(self) -> None:
        buf = self._recv_buf
        while buf and not self._recv_paused:
            item = buf.popleft()
            if item is None:
                self._deliver_eof()
            else:
                self._deliver(item)
        if not buf and self._recv_state == _CLOSE_PENDING:
            self._recv_state = _CLOSED
            self._finish(None)

    def _deliver_eof(self) -> None:
        if not self._session.eof_received() and self._send_state == _OPEN:
            self.write_eof()

    def _discard_recv(self) -> None:
        self._recv_buf.clear()
        self._recv_paused = False
        if self._recv_state == _CLOSE_PENDING:
            self._recv_state = _CLOSED
            self._finish(None)

    def _process_window_adjust(self, packet: SSHPacket) -> None:
        if self._recv_state not in (_OPEN, _EOF):
            raise ProtocolError("Channel not open")
        adjust = packet.get_uint32()
        packet.check_end()
        self.receive_window_adjust(adjust)

    def receive_window_adjust(self, adjust: int) -> None:
        """The server's WINDOW_ADJUST (the fast path of `x2ssh.ssh.tuning` calls this directly)."""
        if self._recv_state not in (_OPEN, _EOF):
            raise ProtocolError("Channel not open")
        self._send_window += adjust
        # Only bytes waiting for the window (or a paused session) need the flush: an EOF or CLOSE pending
        # always has bytes before it. On upload most adjusts find nothing buffered (the client's reads go
        # straight into packets as far as the window goes), so most cost one addition.
        if self._send_buf or self._send_paused:
            self._flush_send()

    def _process_data(self, packet: SSHPacket) -> None:
        data = packet.get_string()
        packet.check_end()
        self.receive_data(data)

    def _process_extended_data(self, packet: SSHPacket) -> None:
        raise ProtocolError("Invalid extended data type")  # a TCP channel has no stderr

    def _process_eof(self, packet: SSHPacket) -> None:
        if self._recv_state != _OPEN:
            raise ProtocolError("Channel not open for sending")
        packet.check_end()
        self.receive_eof()

    def receive_eof(self) -> None:
        """The server's EOF (the fast path of `x2ssh.ssh.tuning` calls this directly)."""
        if self._recv_state != _OPEN:
            raise ProtocolError("Channel not open for sending")
        self._recv_state = _EOF
        if self._recv_paused or self._recv_buf:
            self._recv_buf.append(None)
        elif (  # `_deliver_eof`, without the call
            self._send_state not in (_CLOSE_PENDING, _CLOSED)
            and not self._session.eof_received()
            and self._send_state == _OPEN
        ):
            self.write_eof()

    def _process_close(self, packet: SSHPacket) -> None:
        if self._recv_state not in (_OPEN, _EOF):
            raise ProtocolError("Channel not open")
        packet.check_end()
        self.receive_close()

    def receive_close(self) -> None:
        """The server's CLOSE (the fast path of `x2ssh.ssh.tuning` calls this directly)."""
        if self._recv_state not in (_OPEN, _EOF):
            raise ProtocolError("Channel not open")
        if self._send_state != _CLOSED:  # (once closed, nothing is buffered to send)
            self._close_send()  # answered at once, as asyncssh does; bytes not sent yet are dropped
        if self._recv_buf:  # the session paused reading: what it has not taken yet comes first
            self._recv_state = _CLOSE_PENDING
        else:
            self._recv_state = _CLOSED
            self._finish(None)

    def _process_request(self, packet: SSHPacket) -> None:
        if self._recv_state not in (_OPEN, _EOF):
            raise ProtocolError("Channel not open")
        packet.get_string()
        if packet.get_boolean() and self._send_state not in (_CLOSE_PENDING, _CLOSED):
            self._send(MSG_CHANNEL_FAILURE)  # a TCP channel supports no request

    def _process_response(self, packet: SSHPacket) -> None:
        raise ProtocolError("Unexpected channel response")  # this channel never asks

    # -- the end --

    def _finish(self, exc: Exception | None) -> None:
        """Both sides are closed (or the connection is gone): tell the session once, leave the table."""
        session, self._session = self._session, None
        conn, recv_chan = self._conn, self._recv_chan
        if conn is not None and recv_chan is not None:  # `_release(established=True)`, without the call
            self._recv_chan = None
            conn._channels.pop(recv_chan, None)
            account = self._account
            if account is not None:
                account.channels -= 1
                account.established -= 1
        if session is not None:
            try:
                session.connection_lost(exc)
            except Exception:
                log.debug("channel session's connection_lost failed", exc_info=True)

    def _release(self, established: bool = False) -> None:
        """Leave the connection's channel table (once); `established`: the open had been confirmed."""
        conn, recv_chan = self._conn, self._recv_chan
        if conn is not None and recv_chan is not None:
            self._recv_chan = None
            conn._channels.pop(recv_chan, None)
            account = self._account
            if account is not None:
                account.channels -= 1
                if established:
                    account.established -= 1


_HANDLERS: dict[int, Callable[[TcpChannel, SSHPacket], None]] = {
    MSG_CHANNEL_WINDOW_ADJUST: TcpChannel._process_window_adjust,
    MSG_CHANNEL_DATA: TcpChannel._process_data,
    MSG_CHANNEL_EXTENDED_DATA: TcpChannel._process_extended_data,
    MSG_CHANNEL_EOF: TcpChannel._process_eof,
    MSG_CHANNEL_CLOSE: TcpChannel._process_close,
    MSG_CHANNEL_REQUEST: TcpChannel._process_request,
    MSG_CHANNEL_SUCCESS: TcpChannel._process_response,
    MSG_CHANNEL_FAILURE: TcpChannel._process_response,
}


def open_tcp_channel(
    conn: asyncssh.SSHClientConnection,
    session_factory: Callable[[], Any],
    host: str,
    port: int,
    orig_host: str,
    orig_port: int,
    on_done: OpenDone,
    *,
    window: int,
    max_pktsize: int,
    account: ChannelAccount | None = None,
    refused: OpenRefused | None = None,
) -> TcpChannel:
    """Open a `direct-tcpip` channel to `host`:`port` on `conn`, by callback.

    On confirmation the session `session_factory()` makes gets `connection_made(channel)`, then
    `on_done(channel, None)` follows; on refusal or a lost connection `on_done(None, exc)` with asyncssh's
    `ChannelOpenError`. `on_done` is never called from within this call. Raises `ChannelOpenError` at once
    when the connection is already closed (as asyncssh's `create_connection` does).

    `account` (optional) counts the channel while it exists (see `ChannelAccount`). `refused` (optional)
    is offered a refusal first: when it returns an open that takes over, `on_done` comes from that open
    and the channel's `cancel()` cancels it.
    """
    chan = TcpChannel(conn, session_factory, on_done, window, max_pktsize, account, refused)
    chan.start_open(host, port, orig_host, orig_port)
    return chan
