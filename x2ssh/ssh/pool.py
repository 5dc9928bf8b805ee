"""Several SSH connections to the same server, so that many flows never meet one connection's limits.

Theory of operation. Each SSH connection is served by its own sshd process, with its own open-files limit
(often 1,024 under systemd, so about a thousand channels) and OpenSSH's own cap of 16,384 channels. The
pool hands each new TCP channel to the connection with the fewest channels that has room. It opens another
connection (one at a time, so sshd's MaxStartups is never hit by us) when every connection is at its
bound, or when a server refuses a channel for lack of resources: OpenSSH answers "open failed" when it
cannot even create the socket (EMFILE), unlike "Connection refused" for a closed port. Such a refusal on a
busy connection teaches the pool that connection's real capacity and the channel is retried elsewhere, so
the application never sees it; a refusal on an idle connection is a real one and reaches the application.

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

log = logging.getLogger(__name__)

OPENSSH_MAX_CHANNELS = 16384
DEFAULT_CHANNEL_BOUND = 16000  # below OpenSSH's hard cap; a server's fd limit usually teaches a lower one
AUTO_MAX_CONNECTIONS = 32
CAPACITY_REASONS = ("open failed", "too many open files", "resource shortage")
BUSY = 32  # a refusal "open failed" counts as "full" only on a connection with at least this many channels

Connector = Callable[[], Awaitable[asyncssh.SSHClientConnection]]


def is_capacity_refusal(exc: asyncssh.ChannelOpenError, channels: int) -> bool:
    """True if a refused channel means "this connection is full" rather than "this destination refuses"."""
    if exc.code == asyncssh.OPEN_RESOURCE_SHORTAGE:
        return True
    reason = (exc.reason or "").lower()
    return channels >= BUSY and any(text in reason for text in CAPACITY_REASONS)


@dataclass(eq=False)
class PoolMember:
    """One SSH connection of the pool and what the pool knows about it."""

    conn: asyncssh.SSHClientConnection
    label: str
    bound: int
    channels: int = 0  # open, or being opened
    established: int = 0
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
    ) -> None:
        self._connect = connect
        self.max_connections = max(1, max_connections)
        self.channel_bound = min(channel_bound, OPENSSH_MAX_CHANNELS)
        self.members: list[PoolMember] = []
        self.capacity_refusals = 0
        self.connections_opened = 0
        self._growing: asyncio.Lock | None = None
        self._serial = 0

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
        self, session_factory: Callable[[], Any], *args: Any, **kwargs: Any
    ) -> tuple[asyncssh.SSHTCPChannel, Any]:
        tried: set[int] = set()
        while True:
            member = self._pick(tried) or await self._grow(tried)
            if member is None:
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_RESOURCE_SHORTAGE, "every SSH connection of the pool is full"
                )
            made = False

            def counted_session(member: PoolMember = member) -> Any:
                nonlocal made
                made = True
                member.established += 1
                session = session_factory()
                lost = session.connection_lost

                def connection_lost(exc: Exception | None) -> None:
                    member.channels -= 1
                    member.established -= 1
                    lost(exc)

                session.connection_lost = connection_lost
                return session

            member.channels += 1
            try:
                return await member.conn.create_connection(counted_session, *args, **kwargs)
            except asyncssh.ChannelOpenError as exc:
                if not made:
                    member.channels -= 1
                if not is_capacity_refusal(exc, member.channels + 1):
                    raise
                self._learn_full(member, exc)
                tried.add(id(member))
            except BaseException:
                if not made:
                    member.channels -= 1
                raise

    def _pick(self, tried: set[int]) -> PoolMember | None:
        open_members = [m for m in self.members if m.has_room and id(m) not in tried]
        return min(open_members, key=lambda m: m.channels, default=None)

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
