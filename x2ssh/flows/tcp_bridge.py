"""Splice each TCP flow from the netstack onto an SSH `direct-tcpip` channel to its original destination.

Theory of operation. A new flow arrives as a pending SYN. The bridge opens a channel to the flow's
destination first and only then accepts the flow (the app's handshake completes); a refused or failed
open refuses the flow, so the app sees a RST at once. The open is a callback, not a task, when the
connection offers `open_tcp_channel` (the pool does): no coroutine, task or future per new flow. From
then on two small protocols face each other:

    app <-> TcpTransport (netstack) <-> _AppSide ... _ChannelSide <-> SSHTCPChannel <-> sshd <-> destination

Bytes are passed on as they come; flow control is wired end to end: when the channel's send buffer is full
asyncssh calls `pause_writing`, and the bridge stops reading from the app (its TCP window closes); when the
app does not take bytes fast enough, the netstack transport calls `pause_writing` and the bridge stops
reading the channel (its SSH window closes). Half-close maps FIN <-> EOF in both directions; a reset on
either side aborts the other.

Opening is bounded: at most `BridgeLimits.max_opening` channel opens are in flight at once; further SYNs
wait in a FIFO of at most `max_waiting` and beyond that are refused at once (RST) and counted. A port scan
of thousands of closed ports thus holds a bounded number of channels, tasks and held SYNs, and ordinary
flows keep getting through between the scan's refusals.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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
    opening: int = 0  # channel opens in flight
    waiting: int = 0  # SYNs queued for an open slot
    bytes_up: int = 0  # app -> server
    bytes_down: int = 0  # server -> app


class _ChannelSide(asyncssh.SSHTCPSession):
    """Receives from the SSH channel; feeds the app."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        link = self._link
        link.stats.bytes_down += len(data)
        if link.app is not None:
            link.app.write(data)
        else:  # the server spoke first, before the app's handshake was accepted
            link.early.append(data)

    def eof_received(self) -> bool:
        link = self._link
        link.eof_from_channel = True
        if link.app is not None:
            link.app.write_eof()
        else:
            link.early.append(None)
        return True  # keep the channel half-open: the app may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.channel_closed(exc)

    def pause_writing(self) -> None:
        if self._link.app is not None:
            self._link.app.pause_reading()

    def resume_writing(self) -> None:
        if self._link.app is not None:
            self._link.app.resume_reading()


class _AppSide(asyncio.Protocol):
    """Receives from the app (through the netstack); feeds the channel."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        link = self._link
        link.stats.bytes_up += len(data)
        link.channel.write(data)

    def eof_received(self) -> None:
        link = self._link
        if link.eof_from_channel:
            # Both directions are done: CLOSE instead of EOF saves the round trip in which sshd answers
            # our EOF with its CLOSE. asyncssh sends it after any bytes still queued for the window, and
            # sshd writes what it holds to the destination before it closes that socket: nothing is lost.
            link.closed_channel = True
            link.channel.close()
        else:
            link.channel.write_eof()  # half-close: the server may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.app_closed(exc)

    def pause_writing(self) -> None:
        self._link.channel.pause_reading()

    def resume_writing(self) -> None:
        self._link.channel.resume_reading()


class _Link:
    """One flow and its channel."""

    __slots__ = ("app", "channel", "closed_channel", "done", "early", "eof_from_channel", "stats")

    def __init__(self, stats: BridgeStats) -> None:
        self.stats = stats
        self.channel: Any = None
        self.app: TcpTransport | None = None
        self.done = False
        self.early: list[bytes | None] = []  # channel data (None: EOF) that came before the accept
        self.eof_from_channel = False  # the server's EOF came (after all its data, already handed on)
        self.closed_channel = False  # the bridge already closed the channel (both directions done)

    def attach(self, app: TcpTransport) -> None:
        self.app = app
        for item in self.early:
            if item is None:
                app.write_eof()
            else:
                app.write(item)
        self.early.clear()

    def channel_closed(self, exc: Exception | None) -> None:
        if self.app is not None and not self.app.is_closing():
            if exc is None:
                self.app.close()  # after what is buffered: FIN, then the flow is released
            else:
                self.app.abort()
        self._finish()

    def app_closed(self, exc: Exception | None) -> None:
        if self.channel is not None:
            if exc is None:
                if not self.closed_channel:
                    self.channel.close()
            else:
                self.channel.abort()
        self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.stats.active -= 1


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
        self.connection: asyncssh.SSHClientConnection | None = None
        self.connection_ready = asyncio.Event()
        self.stats = BridgeStats()
        self._opening: dict[int, tuple[_Opening, float]] = {}  # flow id -> (the open in flight, deadline)
        self._expired: set[int] = set()  # opens cancelled by the sweeper: a timeout, not a shutdown
        self._sweeper: asyncio.TimerHandle | None = None
        self._waiting: deque[TcpFlow] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def on_tcp(self, flow: TcpFlow) -> None:
        """Netstack callback for a new connection request (the app's SYN is held meanwhile)."""
        stats = self.stats
        if stats.opening < self.limits.max_opening:
            self._start_open(flow)
        elif len(self._waiting) < self.limits.max_waiting:
            self._waiting.append(flow)
            stats.waiting = len(self._waiting)
        else:
            stats.over_limit += 1
            if stats.over_limit == 1 or stats.over_limit % 1000 == 0:
                log.warning(
                    "%d connection attempts refused so far: %d channel opens in flight, %d waiting",
                    stats.over_limit,
                    stats.opening,
                    len(self._waiting),
                )
            self._refuse(flow)

    def _start_open(self, flow: TcpFlow) -> None:
        self.stats.opening += 1
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop costs a getpid() per call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        opener = getattr(self.connection, "open_tcp_channel", None)
        handle: _Opening
        if opener is None:  # no connection yet, or one that can only be awaited
            handle = loop.create_task(self._open(flow))
        else:
            handle = _FlowOpen(self, flow)
            handle.start(opener, loop)
        self._opening[flow.id] = (handle, loop.time() + self._open_timeout)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep_interval(self) -> float:
        return min(1.0, self._open_timeout / 4)

    def _sweep(self) -> None:
        """Cancel opens past their deadline: one timer for all of them, not one per connection."""
        self._sweeper = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for flow_id, (handle, deadline) in list(self._opening.items()):
            if deadline <= now and flow_id not in self._expired:
                if isinstance(handle, _FlowOpen):
                    handle.expire()
                else:
                    self._expired.add(flow_id)
                    handle.cancel()
        if self._opening:
            self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)

    def _open_done(self, flow: TcpFlow) -> None:
        self._opening.pop(flow.id, None)
        self._expired.discard(flow.id)
        self.stats.opening -= 1
        waiting = self._waiting
        while waiting and self.stats.opening < self.limits.max_opening:
            flow = waiting.popleft()
            if not flow.closed:  # the stack may have released it meanwhile
                self._start_open(flow)
        self.stats.waiting = len(waiting)

    async def _open(self, flow: TcpFlow) -> None:
        """Open the flow's channel, then accept the flow (or refuse it); one task per new flow."""
        try:
            host, port = self._rewrite(flow.dst)
            link = _Link(self.stats)
            try:
                conn = self.connection
                if conn is None:
                    await self.connection_ready.wait()
                    conn = self.connection
                    assert conn is not None
                channel, _ = await conn.create_connection(
                    lambda: _ChannelSide(link),
                    host,
                    port,
                    flow.src[0],
                    flow.src[1],
                    window=CHANNEL_WINDOW,
                    max_pktsize=CHANNEL_MAX_PACKET,
                )
            except asyncio.CancelledError:
                if flow.id not in self._expired:
                    raise  # the bridge is closing
                self._timed_out(flow, host, port)
                return
            except (TimeoutError, OSError, asyncssh.Error, ConnectionError) as exc:
                self._failed(flow, host, port, exc)
                return
            self._opened(flow, link, channel)
        finally:
            self._open_done(flow)

    def _opened(self, flow: TcpFlow, link: _Link, channel: Any) -> None:
        """The channel is open: accept the app's connection and splice the two."""
        if flow.closed:  # the app gave up (or the stack closed) while the channel was opening
            channel.close()
            return
        link.channel = channel
        self.stats.opened += 1
        self.stats.active += 1
        try:
            link.attach(self._tun().accept(flow, lambda: _AppSide(link)))
        except Exception as exc:  # the flow vanished between the check and the accept
            log.debug("accept failed for %r: %s", flow, exc)
            channel.abort()
            link._finish()

    def _failed(self, flow: TcpFlow, host: str, port: int, exc: BaseException) -> None:
        """The channel could not be opened: the app's SYN gets a RST at once."""
        if isinstance(exc, asyncssh.ChannelOpenError):
            self.stats.refused += 1
            log.debug("%s:%d refused by the server: %s", host, port, exc.reason)
        else:
            self.stats.failed += 1
            log.debug("%s:%d: channel failed: %s", host, port, exc)
        self._refuse(flow)

    def _timed_out(self, flow: TcpFlow, host: str, port: int) -> None:
        self.stats.failed += 1
        log.debug("%s:%d: no channel within %.0f s", host, port, self._open_timeout)
        self._refuse(flow)

    @staticmethod
    def _refuse(flow: TcpFlow) -> None:
        if not flow.closed:
            try:
                flow.refuse()
            except Exception as exc:  # already released by the stack
                log.debug("refuse failed for %r: %s", flow, exc)

    def set_connection(self, conn: asyncssh.SSHClientConnection | None) -> None:
        """Use `conn` for new flows; None makes new flows wait (bounded) for the next one."""
        self.connection = conn
        if conn is None:
            self.connection_ready.clear()
        else:
            self.connection_ready.set()

    def close(self) -> None:
        """Cancel the opens in flight and refuse the SYNs still waiting."""
        waiting, self._waiting = self._waiting, deque()
        self.stats.waiting = 0
        for flow in waiting:
            self._refuse(flow)
        for handle, _ in list(self._opening.values()):
            handle.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class _FlowOpen:
    """A new flow's channel open by callback (no task): the bridge's side of `open_tcp_channel`."""

    __slots__ = ("_bridge", "_flow", "_handle", "_host", "_link", "_over", "_port")

    def __init__(self, bridge: TcpBridge, flow: TcpFlow) -> None:
        self._bridge = bridge
        self._flow = flow
        self._host, self._port = bridge._rewrite(flow.dst)
        self._link = _Link(bridge.stats)
        self._handle: Any = None
        self._over = False  # answered, expired or cancelled: whatever comes later is ignored

    def start(self, opener: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> None:
        link, flow = self._link, self._flow
        try:
            self._handle = opener(
                lambda: _ChannelSide(link), self._host, self._port, flow.src[0], flow.src[1], self._done,
                window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PACKET,
            )  # fmt: skip
        except Exception as exc:  # reported on the next turn, like every other outcome
            loop.call_soon(self._done, None, exc)

    def _done(self, channel: Any, exc: BaseException | None) -> None:
        if self._over:
            if channel is not None:
                channel.close()
            return
        self._over = True
        bridge, flow = self._bridge, self._flow
        try:
            if exc is None:
                bridge._opened(flow, self._link, channel)
            else:
                bridge._failed(flow, self._host, self._port, exc)
        finally:
            bridge._open_done(flow)

    def expire(self) -> None:
        """The open took too long: give up on it and refuse the app."""
        if self._over:
            return
        self._over = True
        if self._handle is not None:
            self._handle.cancel()
        bridge, flow = self._bridge, self._flow
        bridge._timed_out(flow, self._host, self._port)
        bridge._open_done(flow)

    def cancel(self) -> None:
        """The bridge is closing: give up quietly (the app's SYN is left to the closing stack)."""
        if self._over:
            return
        self._over = True
        if self._handle is not None:
            self._handle.cancel()
        self._bridge._open_done(self._flow)


_Opening = asyncio.Task[None] | _FlowOpen  # by callback when the connection offers it, else a task
