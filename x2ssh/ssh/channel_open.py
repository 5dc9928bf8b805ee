"""Open a `direct-tcpip` channel by callback instead of through asyncssh's chain of coroutines.

`SSHClientConnection.create_connection` runs five nested coroutines (create_connection, connect,
_open_tcp, _open_forward, _open) around one future, and its caller needs a task to await them: per new
TCP flow a Task, a Future, their callbacks and a loop turn for the wake-up. Here the same packet goes out
(CHANNEL_OPEN with the same fields, the same channel object from `create_tcp_channel`) and the answer is
handled where asyncssh delivers it: asyncssh stores a waiter in the channel and calls `set_result` on
OPEN_CONFIRMATION, `set_exception` on OPEN_FAILURE or when the connection goes away. `ChannelOpening` is
that waiter; on confirmation it does what `_open_forward` does after its await (check the packet, make the
session, `connection_made`, `session_started`, start reading) and then calls `on_done(channel, None)`;
on failure `on_done(None, exc)` with asyncssh's own `ChannelOpenError`.

Reaches into asyncssh's channel internals (`_open_waiter`, `_recv_chan`, `_send_state`): asyncssh is
pinned below 2.25, and tests/unit/test_channel_open.py checks this against a real asyncssh server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.constants import MSG_CHANNEL_OPEN
from asyncssh.packet import String, UInt32

log = logging.getLogger(__name__)

OpenDone = Callable[[Any, BaseException | None], None]
_DIRECT_TCPIP = String(b"direct-tcpip")


class ChannelOpening:
    """One channel open in flight; asyncssh sees it as the channel's open waiter.

    `cancel()` gives up: `on_done` is not called any more, and a confirmation that still comes closes the
    channel at once (asyncssh's own path leaves such a channel open).
    """

    __slots__ = ("_chan", "_factory", "_on_done", "_state")

    def __init__(self, chan: Any, factory: Callable[[], Any], on_done: OpenDone) -> None:
        self._chan = chan
        self._factory = factory
        self._on_done = on_done
        self._state = 0  # 0: in flight, 1: answered, 2: cancelled

    # -- what asyncssh calls on its waiter --

    def cancelled(self) -> bool:
        return False  # asyncssh then always reports the outcome; a cancelled open is handled below

    def set_result(self, packet: Any) -> None:
        chan = self._chan
        if self._state:  # cancelled while in flight: nobody wants this channel
            self._state = 1
            chan.close()
            return
        self._state = 1
        try:
            packet.check_end()  # forward channels carry nothing else in the confirmation
            session = self._factory()
            chan._session = session
            session.connection_made(chan)
            session.session_started()
        except Exception as exc:  # a bad confirmation or a failing session: this channel only
            chan._session = None
            chan.abort()
            self._report(None, exc)
            return
        chan.get_connection().create_task(chan._start_reading(), chan.logger)
        self._report(chan, None)

    def set_exception(self, exc: BaseException) -> None:
        if self._state == 0:
            self._state = 1
            self._report(None, exc)

    # -- the opener's side --

    def cancel(self) -> None:
        """Give up on this open (a timeout, a shutdown)."""
        if self._state == 0:
            self._state = 2

    def _report(self, chan: Any, exc: BaseException | None) -> None:
        # Runs inside asyncssh's packet handling: an error here must not end the SSH connection.
        try:
            self._on_done(chan, exc)
        except Exception as err:
            loop = asyncio.get_running_loop()
            loop.call_exception_handler(
                {"message": "channel open callback failed", "exception": err, "opening": self}
            )


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
) -> ChannelOpening:
    """Send CHANNEL_OPEN direct-tcpip on `conn`; `on_done(channel, None)` or `on_done(None, exc)` follows.

    Raises `asyncssh.ChannelOpenError` at once when the connection is already closed (as
    `create_connection` does). `on_done` is never called from within this call.
    """
    chan = conn.create_tcp_channel(None, "strict", window, max_pktsize)
    chan.set_extra_info(peername=("", 0), local_peername=(orig_host, orig_port), remote_peername=(host, port))
    opening = ChannelOpening(chan, session_factory, on_done)
    chan._open_waiter = opening  # type: ignore[assignment]  # what asyncssh calls on it, nothing more
    conn.send_packet(
        MSG_CHANNEL_OPEN,
        _DIRECT_TCPIP,
        UInt32(chan._recv_chan),  # type: ignore[arg-type]  # set by create_tcp_channel
        UInt32(chan._recv_window),
        UInt32(chan._recv_pktsize),
        String(host),
        UInt32(port),
        String(orig_host),
        UInt32(orig_port),
        handler=chan,
    )
    return opening
