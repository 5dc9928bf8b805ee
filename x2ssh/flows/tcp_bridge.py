"""Splice each TCP flow from the netstack onto an SSH `direct-tcpip` channel to its original destination.

Theory of operation. A new flow arrives as a pending SYN. The bridge opens a channel to the flow's
destination first and only then accepts the flow (the app's handshake completes); a refused or failed
open refuses the flow, so the app sees a RST at once. The open is a callback, not a task, when the
connection offers `open_tcp_channel` (the pool does): no coroutine, task or future per new flow. One
object per flow (`_Flow`) is the open in flight, the channel's session and the link between the two ends;
the netstack transport's protocol is a second, one-field object (`_AppSide`: the method names of the two
interfaces are the same):

    app <-> TcpTransport (netstack) <-> _AppSide -> _Flow <-> TcpChannel <-> sshd <-> destination

Bytes are passed on as they come; flow control is wired end to end: when the channel's send buffer is full
asyncssh calls `pause_writing`, and the bridge stops reading from the app (its TCP window closes); when the
app does not take bytes fast enough, the netstack transport calls `pause_writing` and the bridge stops
reading the channel (its SSH window closes). Half-close maps FIN <-> EOF in both directions; a reset on
either side aborts the other.

Opening is bounded: at most `BridgeLimits.max_opening` channel opens are in flight at once; further SYNs
wait in a FIFO of at most `max_waiting` and beyond that are refused at once (RST) and counted. A port scan
of thousands of closed ports thus holds a bounded number of channels, tasks and held SYNs, and ordinary
flows keep getting through between the scan's refusals. The open timeout is one coarse timer for all
opens: it ticks every `open_timeout / 4` (at most a second) while opens are in flight, and an open is
given up at the first tick at least `open_timeout` after it started.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncssh

from netstack import TcpFlow
from netstack.aio import TcpTransport, TunStack

log = logging.getLogger(__name__)

Address = tuple[str, int]
CHANNEL_WINDOW = 2 * 1024 * 1024  # per-flow memory bound towards the app, with the 1 MiB write buffer
CHANNEL_MAX_PACKET = 32 * 1024  # sshd queues up to this per busy channel per round: its buffer caps the total


@dataclass(frozen=True)
class BridgeLimits:
    """Bounds on what new connections may hold while their channels open.

    `max_opening`: channel opens in flight at once. `max_waiting`: SYNs queued for an open slot (each
    holds a flow and its SYN); beyond it a SYN is refused with a RST at once and counted as `over_limit`.
    `open_timeout`: seconds a channel open may take (waiting for the SSH connection included).
    """

    max_opening: int = 128
    max_waiting: int = 4096
    open_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.max_opening < 1 or self.max_waiting < 0 or self.open_timeout <= 0:
            raise ValueError(f"invalid bridge limits: {self}")


@dataclass
class BridgeStats:
    """Counters for the status view."""

    opened: int = 0
    refused: int = 0  # the server refused the channel (closed port, forbidden...)
    failed: int = 0  # the open failed otherwise (timeout, connection lost)
    over_limit: int = 0  # SYNs refused because too many opens were already waiting
    active: int = 0
    opening: int = 0  # channel opens in flight (as of the last read of `TcpBridge.stats`)
    waiting: int = 0  # SYNs queued for an open slot (likewise)
    bytes_up: int = 0  # app -> server
    bytes_down: int = 0  # server -> app


class _Flow:
    """One flow: its channel open in flight, then the SSH channel's session, linked to the app's transport.

    The channel calls it as an `asyncssh.SSHTCPSession` (duck-typed: that class has no `__slots__`).
    """

    __slots__ = (
        "app", "born", "bridge", "channel", "closed_channel", "done", "early", "eof_from_channel", "flow",
        "handle", "host", "over", "port", "stats",
    )  # fmt: skip

    def __init__(self, bridge: TcpBridge, flow: TcpFlow, born: int) -> None:
        self.bridge = bridge
        self.stats = bridge._stats
        self.flow = flow
        self.host, self.port = bridge._rewrite(flow.dst)
        self.born = born  # the sweeper's tick when the open started
        self.handle: Any = None  # the open in flight (`cancel()`)
        self.over = False  # the open was answered, expired or cancelled: whatever comes later is ignored
        self.channel: Any = None
        self.app: TcpTransport | None = None
        self.early: list[Any] | None = None  # channel data (None: EOF; _Lost: closed) before the accept
        self.eof_from_channel = False  # the server's EOF came (after all its data, already handed on)
        self.closed_channel = False  # the bridge already closed the channel (both directions done)
        self.done = False  # one end has gone: the flow no longer counts as active

    # -- the open --

    def session(self) -> _Flow:
        """The channel's session factory: this flow."""
        return self

    def open_done(self, channel: Any, exc: BaseException | None) -> None:
        """The open's outcome: accept the app's connection and splice it to `channel`, or refuse it."""
        if self.over:
            if channel is not None:
                channel.close()
            return
        self.over = True
        self.handle = None
        bridge = self.bridge
        try:
            if exc is None:
                self._accept(channel)
            else:
                bridge._failed(self, exc)
        finally:
            bridge._opening.pop(self, None)
            if bridge._waiting:
                bridge._admit_waiting()

    def _accept(self, channel: Any) -> None:
        flow = self.flow
        if flow.closed:  # the app gave up (or the stack closed) while the channel was opening
            channel.close()
            return
        self.channel = channel
        stats = self.stats
        stats.opened += 1
        stats.active += 1
        try:
            self.app = app = self.bridge._tun().accept(flow, partial(_AppSide, self))
        except Exception as exc:  # the flow vanished between the check and the accept
            log.debug("accept failed for %r: %s", flow, exc)
            channel.abort()
            self.done = True
            stats.active -= 1
            return
        early = self.early
        if early is not None:  # the server spoke (or even finished) before the app's handshake
            self.early = None
            for item in early:
                if item is None:
                    app.write_eof()
                elif isinstance(item, _Lost):
                    self.connection_lost(item.exc)
                else:
                    app.write(item)

    def expire(self) -> None:
        """The open took too long: give up on it and refuse the app."""
        if self._give_up():
            self.bridge._timed_out(self)
            self.bridge._open_done(self)

    def cancel(self) -> None:
        """The bridge is closing: give up quietly (the app's SYN is left to the closing stack)."""
        if self._give_up():
            self.bridge._open_done(self)

    def _give_up(self) -> bool:
        if self.over:
            return False
        self.over = True
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()
        return True

    # -- the channel's session: from the server to the app --

    def connection_made(self, channel: Any) -> None:
        pass  # the channel comes with `open_done`

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.stats.bytes_down += len(data)
        app = self.app
        if app is not None:
            app.write(data)
        else:  # the server spoke first, before the app's handshake was accepted
            self._hold(data)

    def eof_received(self) -> bool:
        self.eof_from_channel = True
        if self.app is not None:
            self.app.write_eof()
        else:
            self._hold(None)
        return True  # keep the channel half-open: the app may still send

    def connection_lost(self, exc: Exception | None) -> None:
        app = self.app
        if app is None:
            if not self.over:  # closed before the open's answer reached the bridge: passed on at the accept
                self._hold(_Lost(exc))
            return
        if not app.is_closing():
            if exc is None:
                app.close()  # after what is buffered: FIN, then the flow is released
            else:
                app.abort()
        if self.done:  # the app's end had gone already: let go of both ends (see `app_closed`)
            self.app = self.channel = None
        else:
            self.done = True
            self.stats.active -= 1

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_reading()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_reading()

    # -- the end --

    def app_closed(self, exc: Exception | None) -> None:
        """The app's connection is gone: close the channel (abort it on a reset)."""
        channel = self.channel
        if exc is None:
            if not self.closed_channel:
                channel.close()
        else:
            channel.abort()
        if self.done:
            # The channel's end had gone already: let go of both ends. The transport holds its protocol,
            # which holds this flow, which held the transport: without this the three (and the channel)
            # would wait for the cyclic garbage collector instead of going at once.
            self.app = self.channel = None
        else:
            self.done = True
            self.stats.active -= 1

    def _hold(self, item: Any) -> None:
        if self.early is None:
            self.early = []
        self.early.append(item)


class _Lost:
    """The channel closed before the app's connection was accepted (kept with the early data)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc


class _AppSide(asyncio.Protocol):
    """The netstack transport's protocol: from the app to the server."""

    __slots__ = ("_flow",)

    def __init__(self, flow: _Flow) -> None:
        self._flow = flow

    def data_received(self, data: bytes) -> None:
        flow = self._flow
        flow.stats.bytes_up += len(data)
        flow.channel.write(data)

    def eof_received(self) -> None:
        flow = self._flow
        if flow.eof_from_channel:
            # Both directions are done: CLOSE instead of EOF saves the round trip in which sshd answers
            # our EOF with its CLOSE. The channel sends it after any bytes still queued for the window, and
            # sshd writes what it holds to the destination before it closes that socket: nothing is lost.
            flow.closed_channel = True
            flow.channel.close()
        else:
            flow.channel.write_eof()  # half-close: the server may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._flow.app_closed(exc)

    def pause_writing(self) -> None:
        self._flow.channel.pause_reading()

    def resume_writing(self) -> None:
        self._flow.channel.resume_reading()


class TcpBridge:
    """Turns netstack TCP flows into SSH channels. `connection` may be swapped on reconnect."""

    def __init__(
        self,
        tun: Callable[[], TunStack],
        rewrite: Callable[[Address], Address] | None = None,
        open_timeout: float | None = None,
        limits: BridgeLimits | None = None,
    ) -> None:
        self._tun = tun
        self._rewrite = rewrite or (lambda addr: addr)
        self.limits = limits or BridgeLimits()
        self._open_timeout = self.limits.open_timeout if open_timeout is None else open_timeout
        self._max_opening = self.limits.max_opening
        self._connection: asyncssh.SSHClientConnection | None = None
        self._opener: Callable[..., Any] | None = None  # the connection's open by callback, if it has one
        self.connection_ready = asyncio.Event()
        self._stats = BridgeStats()
        self._opening: dict[_Flow, None] = {}  # the opens in flight, oldest first
        self._waiting: deque[TcpFlow] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = 0  # the sweeper's ticks so far: an open's age, coarsely, without a clock per flow
        self._sweep_every = min(1.0, self._open_timeout / 4)
        self._sweep_ticks = math.ceil(self._open_timeout / self._sweep_every - 1e-9)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stats(self) -> BridgeStats:
        """The counters, with the opens in flight and the SYNs waiting as of now."""
        stats = self._stats
        stats.opening = len(self._opening)
        stats.waiting = len(self._waiting)
        return stats

    @property
    def connection(self) -> asyncssh.SSHClientConnection | None:
        """Where new flows' channels open (the pool); None while there is none."""
        return self._connection

    @connection.setter
    def connection(self, conn: asyncssh.SSHClientConnection | None) -> None:
        self.set_connection(conn)

    def on_tcp(self, flow: TcpFlow) -> None:
        """Netstack callback for a new connection request (the app's SYN is held meanwhile)."""
        if len(self._opening) < self._max_opening:
            self._start_open(flow)
        elif len(self._waiting) < self.limits.max_waiting:
            self._waiting.append(flow)
        else:
            stats = self._stats
            stats.over_limit += 1
            if stats.over_limit == 1 or stats.over_limit % 1000 == 0:
                log.warning(
                    "%d connection attempts refused so far: %d channel opens in flight, %d waiting",
                    stats.over_limit,
                    len(self._opening),
                    len(self._waiting),
                )
            self._refuse(flow)

    def _start_open(self, flow: TcpFlow) -> None:
        opening = _Flow(self, flow, self._tick)
        self._opening[opening] = None
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop costs a getpid() per call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        opener = self._opener
        if opener is None:  # no connection yet, or one that can only be awaited
            opening.handle = loop.create_task(self._open_later(opening))
        else:
            src = flow.src
            try:
                opening.handle = opener(
                    opening.session, opening.host, opening.port, src[0], src[1], opening.open_done,
                    window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PACKET,
                )  # fmt: skip
            except Exception as exc:  # reported on the next turn, like every other outcome
                loop.call_soon(opening.open_done, None, exc)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        """Give up the opens past their deadline: one timer for all of them, not one per connection."""
        self._sweeper = None
        self._tick += 1
        last_expired = self._tick - self._sweep_ticks - 1  # born at or before this tick: >= the timeout ago
        expired = []
        for opening in self._opening:  # oldest first
            if opening.born > last_expired:
                break
            expired.append(opening)
        for opening in expired:
            opening.expire()
        if self._opening:
            assert self._loop is not None
            self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    def _open_done(self, opening: _Flow) -> None:
        self._opening.pop(opening, None)
        if self._waiting:
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Start the opens of waiting SYNs, oldest first, as far as the limit allows."""
        waiting = self._waiting
        while waiting and len(self._opening) < self._max_opening:
            flow = waiting.popleft()
            if not flow.closed:  # the stack may have released it meanwhile
                self._start_open(flow)

    async def _open_later(self, opening: _Flow) -> None:
        """Wait for a connection if need be, then open the flow's channel; one task per such flow."""
        flow = opening.flow
        try:
            conn = self._connection
            if conn is None:
                await self.connection_ready.wait()
                conn = self._connection
                assert conn is not None
            channel, _ = await conn.create_connection(
                opening.session,  # type: ignore[arg-type]  # a session by duck typing (see _Flow)
                opening.host, opening.port, flow.src[0], flow.src[1],
                window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PACKET,
            )  # fmt: skip
        except asyncio.CancelledError:
            raise  # expired or cancelled: `_Flow` did what was needed
        except Exception as exc:
            opening.open_done(None, exc)
            return
        opening.open_done(channel, None)

    def _failed(self, opening: _Flow, exc: BaseException) -> None:
        """The channel could not be opened: the app's SYN gets a RST at once."""
        host, port = opening.host, opening.port
        if isinstance(exc, asyncssh.ChannelOpenError):
            self._stats.refused += 1
            log.debug("%s:%d refused by the server: %s", host, port, exc.reason)
        else:
            self._stats.failed += 1
            if isinstance(exc, (OSError, asyncssh.Error, TimeoutError)):
                log.debug("%s:%d: channel failed: %s", host, port, exc)
            else:  # not a failure of the network or the server: worth seeing
                log.warning("%s:%d: channel failed: %r", host, port, exc, exc_info=exc)
        self._refuse(opening.flow)

    def _timed_out(self, opening: _Flow) -> None:
        self._stats.failed += 1
        log.debug("%s:%d: no channel within %.0f s", opening.host, opening.port, self._open_timeout)
        self._refuse(opening.flow)

    @staticmethod
    def _refuse(flow: TcpFlow) -> None:
        if not flow.closed:
            try:
                flow.refuse()
            except Exception as exc:  # already released by the stack
                log.debug("refuse failed for %r: %s", flow, exc)

    def set_connection(self, conn: asyncssh.SSHClientConnection | None) -> None:
        """Use `conn` for new flows; None makes new flows wait (bounded) for the next one."""
        self._connection = conn
        self._opener = getattr(conn, "open_tcp_channel", None)
        if conn is None:
            self.connection_ready.clear()
        else:
            self.connection_ready.set()

    def close(self) -> None:
        """Cancel the opens in flight and refuse the SYNs still waiting."""
        waiting, self._waiting = self._waiting, deque()
        for flow in waiting:
            self._refuse(flow)
        for opening in list(self._opening):
            opening.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
