"""Open the SSH connection the way OpenSSH would, and find the addresses that must bypass the tunnel.

asyncssh reads ~/.ssh/config (or `-F`), identity files, the ssh-agent and ProxyJump itself; this module only
maps x2ssh's settings onto its options and turns its exceptions into x2ssh's user-facing errors.
"""

from __future__ import annotations

import asyncio
import getpass
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.config import SSHClientConfig

from x2ssh.errors import SshAuthFailed, SshConnectError, SshHostKeyRejected, SshHostUnreachable
from x2ssh.settings import Settings
from x2ssh.ssh import tuning as asyncssh_tuning

log = logging.getLogger(__name__)
asyncssh_tuning.install()

# AES-GCM first: with AES-NI it is the cheapest cipher per byte, and bulk throughput is what a VPN needs.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `asyncssh.connect` that mirror the command line and `-o` options."""
    opts: dict[str, Any] = {
        "encryption_algs": list(PREFERRED_CIPHERS),
        "keepalive_interval": settings.keepalive_interval or 0,
        "keepalive_count_max": settings.keepalive_count_max,
    }
    if settings.port is not None:
        opts["port"] = settings.port
    if settings.user is not None:
        opts["username"] = settings.user
    if settings.identities:
        opts["client_keys"] = list(settings.identities)
    if settings.ssh_config is not None:
        opts["config"] = [str(settings.ssh_config)]
    known_hosts = settings.ssh_option("UserKnownHostsFile")
    strict = (settings.ssh_option("StrictHostKeyChecking") or "yes").lower()
    if strict in ("no", "off"):
        opts["known_hosts"] = None  # the user asked for it explicitly, as with OpenSSH
    elif known_hosts:
        opts["known_hosts"] = [p for p in known_hosts.split() if p.lower() != "none"] or None
    timeout = settings.ssh_option("ConnectTimeout")
    opts["connect_timeout"] = float(timeout) if timeout else 15.0
    if (settings.ssh_option("IdentitiesOnly") or "").lower() == "yes":
        opts["agent_path"] = None
    return opts


SocketFactory = Callable[[int, int], Awaitable[socket.socket]]
"""Makes an unconnected socket for (family, type); the VPN's sockets bypass the tunnel."""


async def plain_socket(family: int, kind: int) -> socket.socket:
    """A socket factory for runs without a tunnel (and for tests)."""
    return socket.socket(family, kind)


class UnsupportedSshConfig(SshConnectError):
    """The user's ssh_config asks for something x2ssh cannot do safely (e.g. ProxyCommand with --vpn)."""

    exit_code = 78  # EX_CONFIG


@dataclass(frozen=True)
class ProxySettings:
    """How the SSH connection reaches the server, as ssh_config and the command line say."""

    jump: tuple[str, ...]
    proxy_command: str | None


def proxy_settings(settings: Settings) -> ProxySettings:
    """The effective ProxyJump hops (-J wins over ssh_config) and ProxyCommand for the destination."""
    host = settings.host or settings.destination or ""
    if settings.ssh_config is not None:
        paths = [settings.ssh_config]
    else:
        default = Path("~", ".ssh", "config").expanduser()
        paths = [default] if os.access(default, os.R_OK) else []
    try:
        local_user = getpass.getuser()
    except KeyError:
        local_user = ""
    try:
        config = SSHClientConfig.load(
            None, paths, False, False, False, local_user, settings.user or (), host, settings.port or ()
        )
    except (OSError, asyncssh.ConfigParseError) as exc:
        raise UnsupportedSshConfig(f"cannot read ssh config: {exc}") from None
    command = config.get("ProxyCommand")
    if isinstance(command, list | tuple):
        command = " ".join(map(str, command))
    if command is not None and str(command).lower() == "none":
        command = None
    jump = settings.jump
    configured = config.get("ProxyJump")
    if not jump and isinstance(configured, str) and configured.lower() != "none":
        jump = tuple(hop.strip() for hop in configured.split(",") if hop.strip())
    return ProxySettings(jump, str(command) if command is not None else None)


class OutsideTunnel:
    """An asyncssh "tunnel" that opens the first TCP connection on a socket from `factory`.

    With the VPN's factory those sockets carry x2ssh's firewall mark, so the connection to the server (or to
    the first ProxyJump hop) follows the machine's own routes wherever they point now, never the tunnel.
    asyncssh hands it the host and port after applying ssh_config (HostName, Port).
    """

    def __init__(
        self, factory: SocketFactory, endpoint: tuple[str, int] | None = None, timeout: float = 15.0
    ) -> None:
        self.factory = factory
        self.endpoint = endpoint
        self.timeout = timeout

    async def create_connection(
        self, session_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        loop = asyncio.get_running_loop()
        if self.endpoint is not None:
            family = socket.AF_INET6 if ":" in self.endpoint[0] else socket.AF_INET
            targets: list[tuple[int, Any]] = [(family, self.endpoint)]
        else:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            targets = [(info[0], info[4]) for info in infos]
        error: BaseException = OSError(f"no address for {host}")
        for family, address in targets:
            sock = await self.factory(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, address), self.timeout)
            except (OSError, TimeoutError) as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return await loop.create_connection(session_factory, sock=sock)
        raise error


async def connect_ssh(
    settings: Settings,
    endpoint: tuple[str, int] | None = None,
    socket_factory: SocketFactory = plain_socket,
    proxy: ProxySettings | None = None,
) -> asyncssh.SSHClientConnection:
    """Connect and authenticate, or raise an `SshConnectError` subclass with a message for people.

    The first TCP connection is made on a socket from `socket_factory`. With `endpoint` it goes to that
    address and port instead of resolving the host name again: while the tunnel is down, the name could only
    be resolved through the tunnel itself. The name still selects ssh_config settings and the known_hosts
    entry. A ProxyCommand is refused: its process's traffic would enter the tunnel it carries.
    """
    host = settings.host or settings.destination or ""
    target = f"{settings.user + '@' if settings.user else ''}{host}"
    proxy = proxy or proxy_settings(settings)
    if proxy.proxy_command is not None:
        raise UnsupportedSshConfig(
            f"{target}: ssh_config sets ProxyCommand ({proxy.proxy_command}); x2ssh --vpn cannot keep a "
            "proxy program's traffic out of the tunnel it carries. Use ProxyJump instead (-J or ProxyJump "
            "in ssh_config), or ProxyCommand=none for this host."
        )
    options = connect_options(settings)
    outside = OutsideTunnel(socket_factory, endpoint, options["connect_timeout"])
    try:
        if proxy.jump:
            options["tunnel"] = await _connect_hops(proxy.jump, options, outside)
        else:
            options["tunnel"] = outside
        try:
            conn = await asyncssh.connect(host, **options)
        except BaseException:
            if proxy.jump:
                options["tunnel"].close()
            raise
        if proxy.jump:
            conn.set_tunnel(options["tunnel"])  # closing the connection closes the hops too
        asyncssh_tuning.coalesce_sends(conn)
        return conn
    except asyncssh.HostKeyNotVerifiable as exc:
        raise SshHostKeyRejected(
            f"{target}: the server's host key is unknown or has changed ({exc.reason}); refusing to connect. "
            "Check the key and add it to known_hosts (ssh-keyscan / ssh once interactively)."
        ) from None
    except asyncssh.PermissionDenied as exc:
        raise SshAuthFailed(f"{target}: authentication failed ({exc.reason})") from None
    except asyncssh.KeyImportError as exc:
        raise SshAuthFailed(f"{target}: cannot use the identity: {exc}") from None
    except asyncssh.DisconnectError as exc:
        raise SshConnectError(f"{target}: the server closed the connection: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or "timed out")
        raise SshHostUnreachable(f"{target}: cannot reach the SSH server: {reason}") from None
    except asyncssh.Error as exc:
        raise SshConnectError(f"{target}: {exc}") from None


def parse_hop(hop: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`) -> (user, host, port)."""
    user, _, rest = hop.rpartition("@")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = int(tail[1:]) if tail.startswith(":") else None
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = int(port_text)
    else:
        host, port = rest, None
    return user or None, host, port


async def _connect_hops(
    jumps: tuple[str, ...], options: dict[str, Any], outside: OutsideTunnel
) -> asyncssh.SSHClientConnection:
    """Connect through each ProxyJump hop in turn with the user's keys and known_hosts (asyncssh's own
    string form would verify hops against the defaults only); the first hop's TCP goes `outside`."""
    shared = {k: v for k, v in options.items() if k not in ("port", "username", "tunnel", "sock")}
    conn: asyncssh.SSHClientConnection | None = None
    try:
        for hop in jumps:
            user, host, port = parse_hop(hop)
            extra: dict[str, Any] = {"tunnel": conn if conn is not None else outside}
            if user:
                extra["username"] = user
            if port:
                extra["port"] = port
            hop_conn = await asyncssh.connect(host, **shared, **extra)
            if conn is not None:
                hop_conn.set_tunnel(conn)
            conn = hop_conn
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    assert conn is not None
    return conn


def peer_endpoint(conn: asyncssh.SSHClientConnection) -> tuple[IpAddress, int] | None:
    """Where our TCP connection actually goes: the server, or the first ProxyJump hop (address, port)."""
    peer = conn.get_extra_info("peername")
    while not (peer and peer[0]) and (tunnel := getattr(conn, "_tunnel", None)) is not None:
        conn = tunnel  # through a jump host: the socket belongs to the first hop
        peer = conn.get_extra_info("peername")
    if not (peer and peer[0]):
        return None
    return ipaddress.ip_address(str(peer[0]).split("%")[0]), int(peer[1])


def peer_address(conn: asyncssh.SSHClientConnection) -> IpAddress | None:
    """The address our TCP connection actually goes to."""
    endpoint = peer_endpoint(conn)
    return endpoint[0] if endpoint else None


async def bypass_addresses(
    settings: Settings, conn: asyncssh.SSHClientConnection, jump: tuple[str, ...] = ()
) -> list[IpAddress]:
    """Every address that must keep its original path: the connected peer plus each ProxyJump hop (only the
    split-route fallback needs them; policy routing follows the socket's mark instead)."""
    found: list[IpAddress] = []
    first = peer_address(conn)
    if first is not None:
        found.append(first)
    loop = asyncio.get_running_loop()
    for hop in jump or settings.jump:
        name = parse_hop(hop)[1]
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            continue  # an ssh_config alias only asyncssh can resolve: the first hop is covered by the peer
        for info in infos:
            addr = ipaddress.ip_address(info[4][0].split("%")[0])
            if addr not in found:
                found.append(addr)
    return found
