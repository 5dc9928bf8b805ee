"""What the proxy port needs from the session (`SocksBackend`), its settings and counters, and how a failed
open becomes a SOCKS reply code.

The session implements `SocksBackend` on its SSH connection pool and the agent; `SshChannelBackend` does the
TCP part for any object with asyncssh's `create_connection` and takes the resolver and the UDP sender as
callables. Nothing here needs the native netstack, so the proxy runs wherever Python and asyncssh do.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncssh

from x2ssh.frontends.socks_protocol import Reply

Address = tuple[str, int]
CHANNEL_WINDOW = 2 * 1024 * 1024  # as flows/tcp_bridge.py (not imported: it needs the native netstack)
CHANNEL_MAX_PACKET = 32 * 1024


class NameNotFound(Exception):
    """A backend's `resolve()` found no address for the name (the client gets "host unreachable")."""


class TcpChannel(Protocol):
    """The channel side of a spliced flow (`asyncssh.SSHTCPChannel` is one)."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class SocksBackend(Protocol):
    """What the proxy needs from the session: resolve names, open TCP channels, send UDP datagrams.

    The session implements it on its SSH connection pool and agent; `SshChannelBackend` below does the TCP
    part for any object with asyncssh's `create_connection`. A backend may also have `open_tcp_now` (see
    `SshChannelBackend.open_tcp_now`): the proxy then opens a channel to an address by callback, without a
    task, whenever the backend can start the open at once.
    """

    async def resolve(self, name: str) -> list[str]:
        """Addresses of `name` as the SSH server's resolver sees them (agent DNS or DNS over TCP).

        Raise `NameNotFound` (or return []) for a name that does not exist; `TimeoutError` if no answer."""
        ...

    async def open_tcp(
        self, host: str, port: int, session_factory: Callable[[], asyncssh.SSHTCPSession], origin: Address
    ) -> tuple[TcpChannel, asyncssh.SSHTCPSession]:
        """Open a `direct-tcpip` channel to the address `host`:`port` with the session `session_factory()`
        makes, as `SSHClientConnection.create_connection` does (`origin` is the client's address). Raise
        `asyncssh.ChannelOpenError` when the server refuses; wait (bounded) for a connection if needed."""
        ...

    def udp_send(self, src: Address, dst: Address, payload: bytes) -> None:
        """Send `payload` from the association `src` to `dst` (an address) through the agent; drop it
        when that is not possible. Replies go to `SocksServer.udp_from_remote(source, src, payload)`."""
        ...


@dataclass(frozen=True)
class SocksSettings:
    """Limits and timeouts of the proxy port."""

    max_clients: int = 4096
    handshake_timeout: float = 30.0  # from accept to a complete request
    resolve_timeout: float = 10.0
    open_timeout: float = 15.0
    client_write_limit: int = 256 * 1024  # bytes queued towards one client before its channel pauses
    udp_write_limit: int = 256 * 1024
    udp_name_cache: int = 64
    udp_resolving: int = 8


@dataclass
class SocksStats:
    """Counters for the status view."""

    clients: int = 0
    active: int = 0
    refused_clients: int = 0
    protocol_errors: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0
    udp_to_remote: int = 0
    udp_to_client: int = 0
    udp_drops: Counter[str] = field(default_factory=Counter)


def reply_for_error(exc: BaseException) -> Reply:
    """The SOCKS reply code that tells the client what went wrong."""
    if isinstance(exc, asyncssh.ChannelOpenError):
        reason = (exc.reason or "").lower()
        if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return Reply.NOT_ALLOWED
        if "refused" in reason:
            return Reply.CONNECTION_REFUSED
        if "network is unreachable" in reason:
            return Reply.NETWORK_UNREACHABLE
        if "timed out" in reason:
            return Reply.TTL_EXPIRED
        if exc.code == asyncssh.OPEN_CONNECT_FAILED:  # "No route to host", "open failed", ...
            return Reply.HOST_UNREACHABLE
        return Reply.GENERAL_FAILURE
    if isinstance(exc, TimeoutError):
        return Reply.TTL_EXPIRED
    if isinstance(exc, NameNotFound):
        return Reply.HOST_UNREACHABLE
    if isinstance(exc, ConnectionRefusedError):
        return Reply.CONNECTION_REFUSED
    return Reply.GENERAL_FAILURE


class Opening(Protocol):
    """A channel open in flight, started by `open_tcp_now`."""

    def cancel(self) -> None: ...


OpenDone = Callable[[Any, BaseException | None], None]


class SshChannelBackend:
    """The TCP part of a `SocksBackend` on anything with asyncssh's `create_connection` (a connection or
    the session's `ConnectionPool`); names and UDP are delegated to the callables given. With `pool_now`
    (the session's `ConnectionPool` when it has a connection now, else None) channels open by callback."""

    def __init__(
        self,
        connection: Callable[[], Awaitable[Any]],
        resolve: Callable[[str], Awaitable[list[str]]],
        udp_send: Callable[[Address, Address, bytes], None] | None = None,
        pool_now: Callable[[], Any] | None = None,
    ) -> None:
        self._connection = connection
        self._resolve = resolve
        self._udp_send = udp_send
        self._pool_now = pool_now

    def open_tcp_now(
        self,
        host: str,
        port: int,
        session_factory: Callable[[], asyncssh.SSHTCPSession],
        origin: Address,
        on_done: OpenDone,
    ) -> Opening | None:
        """Start opening a channel to the address `host`:`port` by callback (`on_done(channel, None)` or
        `on_done(None, exc)`, never from within this call), or return None when that cannot start now
        (no connection yet: `open_tcp` waits for one)."""
        pool = self._pool_now() if self._pool_now is not None else None
        if pool is None:
            return None
        opening: Opening = pool.open_tcp_channel(
            session_factory, host, port, origin[0], origin[1], on_done,
            window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PACKET,
        )  # fmt: skip
        return opening

    async def resolve(self, name: str) -> list[str]:
        return await self._resolve(name)

    async def open_tcp(
        self, host: str, port: int, session_factory: Callable[[], asyncssh.SSHTCPSession], origin: Address
    ) -> tuple[TcpChannel, asyncssh.SSHTCPSession]:
        conn = await self._connection()
        return await conn.create_connection(
            session_factory,
            host,
            port,
            origin[0],
            origin[1],
            window=CHANNEL_WINDOW,
            max_pktsize=CHANNEL_MAX_PACKET,
        )

    def udp_send(self, src: Address, dst: Address, payload: bytes) -> None:
        if self._udp_send is not None:
            self._udp_send(src, dst, payload)


def is_address(host: str) -> bool:
    """True for an IPv4 or IPv6 address literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def canonical_host(host: str) -> str:
    """IPv4-mapped IPv6 addresses as IPv4, so a dual-stack socket's peer compares equal."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
