"""Several SSH connections to the same server, so that many flows never meet one connection's limits.

Theory of operation. Each SSH connection is served by its own sshd process, with its own open-files limit
(often 1,024 under systemd, so about a thousand channels) and OpenSSH's own cap of 16,384 channels. The
pool hands each new TCP channel to the connection with the fewest channels that has room. It opens another
connection (one at a time, so sshd's MaxStartups is never hit by us) when every connection is at its
bound, or when a server refuses a channel for lack of resources: OpenSSH answers "open failed" when it
cannot even create the socket (EMFILE), unlike "Connection refused" for a closed port. Such a refusal on a
busy connection teaches the pool that connection's real capacity and the channel is retried elsewhere, so
the application never sees it; a refusal on an idle connection is a real one and reaches the application.

The usual case costs one pick and the channel itself: the channel counts itself on its connection (see
`tcp_channel.ChannelAccount`) and a refusal goes to the pool's hook, which starts a `PoolOpening` (the
retry elsewhere, or growing the pool) only when the refusal says the connection is full. Only then is
there an object of the pool's per flow, and a task only while a connection is being opened.

The first connection (the session's, which also carries the agent) is set and replaced by the session as it
reconnects; the extra ones are opened on demand and dropped when they close, to be opened again on demand.
Refusals are counted and logged, never silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from x2ssh.ssh.tcp_channel import Cancellable, OpenDone, TcpChannel, open_tcp_channel

log = logging.getLogger(__name__)

OPENSSH_MAX_CHANNELS = 16384
DEFAULT_CHANNEL_BOUND = 16000  # below OpenSSH's hard cap; a server's fd limit usually teaches a lower one
AUTO_MAX_CONNECTIONS = 32
CAPACITY_REASONS = ("open failed", "too many open files", "resource shortage")
DEFAULT_WINDOW = 2 * 1024 * 1024  # asyncssh's defaults for create_connection
DEFAULT_MAX_PACKET = 32 * 1024
BUSY = 32  # a refusal "open failed" counts as "full" only on a connection with at least this many channels

Connector = Callable[[], Awaitable[asyncssh.SSHClientConnection]]
Opener = Callable[..., Any]  # tcp_channel.open_tcp_channel's signature; tests pass a fake


def is_capacity_refusal(exc: asyncssh.ChannelOpenError, channels: int) -> bool:
    """True if a refused channel means "this connection is full" rather than "this destination refuses"."""
    if exc.code == asyncssh.OPEN_RESOURCE_SHORTAGE:
        return True
    reason = (exc.reason or "").lower()
    return channels >= BUSY and any(text in reason for text in CAPACITY_REASONS)


@dataclass(eq=False)
class PoolMember:
    """One SSH connection of the pool and what the pool knows about it (its channels count themselves)."""

    conn: asyncssh.SSHClientConnection
    label: str
    bound: int
    channels: int = 0  # open, or being opened
    established: int = 0  # open
    refusals: int = 0
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def has_room(self) -> bool:
        return self.channels < self.bound and not self.conn.is_closed()


class ConnectionPool:
    """Opens TCP channels like an `SSHClientConnection` does, spread over up to `max_connections`."""

    def __init__(
        self,
        connect: Connector,
        max_connections: int = AUTO_MAX_CONNECTIONS,
        channel_bound: int = DEFAULT_CHANNEL_BOUND,
        opener: Opener = open_tcp_channel,
    ) -> None:
        self._connect = connect
        self._opener = opener
        self.max_connections = max(1, max_connections)
        self.channel_bound = min(channel_bound, OPENSSH_MAX_CHANNELS)
        self.members: list[PoolMember] = []
        self.capacity_refusals = 0
        self.connections_opened = 0
        self._growing: asyncio.Lock | None = None
        self._serial = 0
        self._on_refused = self._refused  # one bound method for every channel, not one per flow

    # -- the session's side --

    def set_primary(self, conn: asyncssh.SSHClientConnection | None) -> None:
        """The session's own connection (None while it reconnects); extra connections are kept."""
        self.members = [m for m in self.members if m.label != "primary" and not m.conn.is_closed()]
        if conn is not None:
            self.members.insert(0, PoolMember(conn, "primary", self.channel_bound))

    def close(self) -> None:
        """Close the extra connections (the session closes its own)."""
        for member in self.members:
            if member.label != "primary":
                member.conn.close()
        self.members = []

    def describe(self) -> list[dict[str, Any]]:
        """Each connection's label, channels, learned bound and age (for the status)."""
        now = time.monotonic()
        return [
            {
                "label": m.label,
                "channels": m.established,
                "bound": m.bound,
                "refusals": m.refusals,
                "up_s": round(now - m.opened_at, 1),
            }
            for m in self.members
            if not m.conn.is_closed()
        ]

    # -- the bridge's side: the same call as SSHClientConnection.create_connection --

    async def create_connection(
        self,
        session_factory: Callable[[], Any],
        host: str,
        port: int,
        orig_host: str = "",
        orig_port: int = 0,
        *,
        window: int = DEFAULT_WINDOW,
        max_pktsize: int = DEFAULT_MAX_PACKET,
    ) -> tuple[Any, Any]:
        """`open_tcp_channel` awaited, in the shape of asyncssh's `create_connection`: (channel, session)."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sessions: list[Any] = []

        def make() -> Any:
            sessions.append(session_factory())
            return sessions[-1]

        def on_done(chan: Any, exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(chan) if exc is None else done.set_exception(exc)

        opening = self.open_tcp_channel(
            make, host, port, orig_host, orig_port, on_done, window=window, max_pktsize=max_pktsize
        )
        try:
            chan = await done
        except asyncio.CancelledError:
            opening.cancel()
            raise
        return chan, sessions[-1]

    def open_tcp_channel(
        self,
        session_factory: Callable[[], Any],
        host: str,
        port: int,
        orig_host: str,
        orig_port: int,
        on_done: OpenDone,
        *,
        window: int,
        max_pktsize: int,
    ) -> Cancellable:
        """`create_connection` by callback (see `tcp_channel.open_tcp_channel`): no task while a connection
        has room; `on_done(channel, None)` or `on_done(None, exc)` follows, never from within this call.
        Returns the open in flight (`cancel()`: no callback follows).

        With room on a connection the channel opens there directly (nothing else per flow); a capacity
        refusal reaches `_refused`, which moves the open to another connection."""
        member = self._pick(None)
        if member is not None:
            try:
                opened: Cancellable = self._opener(
                    member.conn, session_factory, host, port, orig_host, orig_port, on_done,
                    window=window, max_pktsize=max_pktsize, account=member, refused=self._on_refused,
                )  # fmt: skip
                return opened
            except Exception:  # the connection closed under us: the open below reports it on a later turn
                pass
        opening = PoolOpening(self, session_factory, (host, port, orig_host, orig_port), on_done)
        opening.window, opening.max_pktsize = window, max_pktsize
        opening.start()
        return opening

    def _refused(self, chan: TcpChannel, exc: asyncssh.ChannelOpenError) -> PoolOpening | None:
        """A channel opened directly was refused: a capacity refusal moves its open to another connection
        (the channel then leaves the caller to the `PoolOpening` returned); any other refusal is the
        caller's (None)."""
        member = chan.account
        assert isinstance(member, PoolMember)
        if not is_capacity_refusal(exc, member.channels + 1):  # (the channel has already taken itself off)
            return None
        self._learn_full(member, exc)
        request = chan.open_request()
        opening = PoolOpening(
            self, request.session_factory, (request.host, request.port, request.orig_host, request.orig_port),
            request.on_done,
        )  # fmt: skip
        opening.window, opening.max_pktsize = request.window, request.max_pktsize
        opening._tried.add(id(member))
        opening.start()
        return opening

    def _pick(self, tried: set[int] | None) -> PoolMember | None:
        """The member with room and the fewest channels, not in `tried` (called for every new flow)."""
        best: PoolMember | None = None
        for member in self.members:
            if (
                member.channels < member.bound
                and (best is None or member.channels < best.channels)
                and not (tried and id(member) in tried)
                and not member.conn.is_closed()
            ):
                best = member
        return best

    def _learn_full(self, member: PoolMember, exc: asyncssh.ChannelOpenError) -> None:
        member.refusals += 1
        self.capacity_refusals += 1
        learned = max(BUSY, member.established)  # opens still in flight may fail the same way
        if learned < member.bound:
            member.bound = learned
            log.warning(
                "SSH connection %s is full at %d channels (server said %r): using another for new flows",
                member.label,
                learned,
                exc.reason,
            )

    async def _grow(self, tried: set[int]) -> PoolMember | None:
        """Open one more connection (one opening at a time); None if the pool may not grow."""
        if self._growing is None:
            self._growing = asyncio.Lock()
        async with self._growing:
            member = self._pick(tried)  # another flow may have grown the pool meanwhile
            if member is not None:
                return member
            self.members = [m for m in self.members if not m.conn.is_closed()]
            if len(self.members) >= self.max_connections:
                return None
            try:
                conn = await self._connect()
            except Exception as exc:  # the session's connector raises SshConnectError and friends
                log.warning("cannot open another SSH connection for the pool: %s", exc)
                return None
            self._serial += 1
            member = PoolMember(conn, f"extra-{self._serial}", self.channel_bound)
            self.members.append(member)
            self.connections_opened += 1
            log.info("opened SSH connection %s: %d in the pool", member.label, len(self.members))
            return member


class PoolOpening:
    """One channel open through the pool that needs more than one try, by callback.

    Used when no connection has room (the pool grows first) and after a capacity refusal: tries the
    connection with the fewest channels that has room and is not `tried` yet; a capacity refusal teaches
    the pool and the open moves on; only growing the pool (connecting) runs in a task.
    """

    __slots__ = (
        "_args", "_factory", "_inner", "_member", "_on_done", "_pool", "_state", "_task", "_tried",
        "max_pktsize", "window",
    )  # fmt: skip

    def __init__(
        self, pool: ConnectionPool, factory: Callable[[], Any], args: tuple[Any, ...], on_done: OpenDone
    ) -> None:
        self._pool = pool
        self._factory = factory
        self._args = args
        self._on_done = on_done
        self._tried: set[int] = set()
        self._member: PoolMember | None = None
        self._inner: Any = None  # the channel open in flight
        self._task: asyncio.Task[None] | None = None
        self._state = 0  # 0: opening, 1: done, 2: cancelled
        self.window = 0
        self.max_pktsize = 0

    def start(self) -> None:
        member = self._pool._pick(self._tried)
        if member is None:
            self._task = asyncio.get_running_loop().create_task(self._grow_then_try())
        else:
            self._try(member)

    def cancel(self) -> None:
        """Give up: no callback follows; a channel confirmed later is closed."""
        if self._state:
            return
        self._state = 2
        if self._inner is not None:  # (it stays counted on its connection until the server answers)
            self._inner.cancel()
            self._inner = None
        if self._task is not None:
            self._task.cancel()

    async def _grow_then_try(self) -> None:
        member = await self._pool._grow(self._tried)
        if self._state:
            return
        if member is None:
            self._state = 1
            self._on_done(
                None,
                asyncssh.ChannelOpenError(
                    asyncssh.OPEN_RESOURCE_SHORTAGE, "every SSH connection of the pool is full"
                ),
            )
        else:
            self._try(member)

    def _try(self, member: PoolMember) -> None:
        self._member = member
        try:
            self._inner = self._pool._opener(
                member.conn, self._factory, *self._args, self._done,
                window=self.window, max_pktsize=self.max_pktsize, account=member,
            )  # fmt: skip
        except Exception as exc:  # the connection closed under us: asyncssh refuses at once
            asyncio.get_running_loop().call_soon(self._retry_or_fail, member, exc)

    def _done(self, chan: Any, exc: BaseException | None) -> None:
        self._inner = None
        member = self._member
        assert member is not None
        if exc is None:
            self._state = 1
            self._on_done(chan, None)
            return
        self._retry_or_fail(member, exc)

    def _retry_or_fail(self, member: PoolMember, exc: BaseException) -> None:
        if self._state:
            return
        if isinstance(exc, asyncssh.ChannelOpenError) and is_capacity_refusal(exc, member.channels + 1):
            self._pool._learn_full(member, exc)
            self._tried.add(id(member))
            self.start()
            return
        self._state = 1
        self._on_done(None, exc)
