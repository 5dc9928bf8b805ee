"""`x2ssh -D [bind_address:]port DESTINATION`: the SOCKS5 and HTTP CONNECT proxy, alone or beside the VPN.

No root and no TUN: the proxy hands its TCP flows to the session's connection pool, names to the server's
own resolver (asked over TCP through the connection, so sshd never blocks on a lookup), and UDP ASSOCIATE
datagrams to the agent. The SSH side reconnects as in VPN mode; the proxy keeps listening meanwhile and new
requests wait (bounded) for the next connection.

`ProxyPort` is the proxy on a session, whoever owns the session: `ProxyRun` here (`x2ssh -D`), or the VPN
(`x2ssh --vpn -D`), which starts it in its own, unprivileged process, so the port is opened by the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x2ssh.control import ControlServer, private_control_dir, start_control, user_run_dir
from x2ssh.errors import X2sshError
from x2ssh.frontends.socks import SocksServer, check_bind
from x2ssh.frontends.socks_backend import Address, SshChannelBackend
from x2ssh.frontends.socks_protocol import Credentials
from x2ssh.frontends.stop import StopRequest
from x2ssh.session import SshSession
from x2ssh.settings import Settings
from x2ssh.ssh.connect import plain_socket
from x2ssh.status import RateMeter

log = logging.getLogger("x2ssh.proxy")

CONNECTION_WAIT = 15.0  # how long a new request waits for the SSH connection while it reconnects
STATUS_INTERVAL = 1.0
LOG_INTERVAL = 60.0


class ProxyListenFailed(X2sshError):
    """The proxy's port cannot be opened (taken, or an address this machine does not have)."""

    exit_code = 73  # EX_CANTCREAT


@dataclass(frozen=True)
class ProxyCounts:
    """The proxy's share of the status document's `tcp` and `bytes` (all zero: no proxy)."""

    open: int = 0
    total: int = 0
    refused: int = 0  # SOCKS reply 5: the destination refused
    failed: int = 0  # clients that broke the protocol
    bytes_up: int = 0
    bytes_down: int = 0

    def tcp(self) -> dict[str, int]:
        """The status document's `tcp` object."""
        return {"open": self.open, "total": self.total, "refused": self.refused, "failed": self.failed}


class ProxyPort:
    """The SOCKS5/HTTP CONNECT port (`settings.dynamic`) on `ssh`: channels from its pool, names from the
    server's resolver, UDP through its agent. The session's owner calls `on_attach`/`on_detach` from the
    session's hooks and hands it the UDP replies for its associations (`takes_udp`, `udp_to_app`)."""

    def __init__(self, settings: Settings, ssh: SshSession) -> None:
        assert settings.dynamic is not None
        self.ssh = ssh
        self._attached = asyncio.Event()
        backend = SshChannelBackend(self._pool, ssh.resolve, ssh.udp_from_app, self._pool_now)
        host, port = settings.dynamic
        self.server = SocksServer(
            backend, host, port, credentials=_credentials(settings), allow_lan=settings.allow_lan
        )

    async def start(self) -> None:
        """Listen; ProxyBindRefused, or ProxyListenFailed when the port cannot be had."""
        try:
            await self.server.start()
        except OSError as exc:
            where = _endpoint((self.server.host or "*", self.server.port))
            raise ProxyListenFailed(f"cannot open the proxy on {where}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        """Stop listening; drop every client and UDP association."""
        with contextlib.suppress(Exception):
            await self.server.close()

    def on_attach(self) -> None:
        """The session has a connection: waiting requests go on."""
        self._attached.set()

    def on_detach(self) -> None:
        """The connection is lost: new requests wait (bounded) for the next one."""
        self._attached.clear()

    def takes_udp(self, app: Address) -> bool:
        """Whether a UDP reply addressed to `app` belongs to one of this port's associations."""
        return self.server.has_association(app)

    def udp_to_app(self, src: Address, dst: Address, payload: bytes) -> None:
        """A UDP reply from `src` for the association `dst`."""
        self.server.udp_from_remote(src, dst, payload)

    def counts(self) -> ProxyCounts:
        """The proxy's TCP clients and bytes so far, as the status document counts them."""
        stats = self.server.stats
        return ProxyCounts(
            open=stats.active,
            total=stats.clients,
            refused=stats.replies.get("CONNECTION_REFUSED", 0),
            failed=stats.protocol_errors,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
        )

    @property
    def where(self) -> str:
        """The bound addresses, e.g. "127.0.0.1:1080, [::1]:1080"."""
        return ", ".join(_endpoint(a) for a in self.server.addresses)

    def _pool_now(self) -> Any:
        """The pool if a connection is there now, else None (then `_pool` waits for one)."""
        return self.ssh.pool if self._attached.is_set() else None

    async def _pool(self) -> Any:
        """Where channels open: the pool, once a connection is there (bounded wait while reconnecting)."""
        if not self._attached.is_set():
            await asyncio.wait_for(self._attached.wait(), CONNECTION_WAIT)
        return self.ssh.pool


def check_proxy_bind(settings: Settings) -> None:
    """Refuse -D beyond loopback without credentials unless --allow-lan (ProxyBindRefused, a UsageError):
    what a run calls before it connects or changes anything."""
    assert settings.dynamic is not None
    check_bind(settings.dynamic[0], _credentials(settings), settings.allow_lan)


def _credentials(settings: Settings) -> Credentials | None:
    if settings.socks_username is None or settings.socks_password is None:
        return None
    return Credentials(settings.socks_username, settings.socks_password)


async def run_proxy(settings: Settings) -> int:
    """Serve the proxy until a signal or a final failure; returns the process exit code."""
    return await ProxyRun(settings).run()


class ProxyRun:
    """`x2ssh -D`: the session plus the proxy port on top of it, nothing else."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ssh = SshSession(
            settings,
            plain_socket,
            lambda src, dst, payload: self.port.udp_to_app(src, dst, payload),
            on_attach=lambda: self.port.on_attach(),
            on_detach=lambda: self.port.on_detach(),
        )
        self.port = ProxyPort(settings, self.ssh)
        self.control: ControlServer | None = None
        self.rates = RateMeter()  # sampled each status tick, as the VPN's status loop does
        self._stop = StopRequest("stopping")

    async def run(self) -> int:
        with self._stop:
            check_proxy_bind(self.settings)  # a LAN bind without credentials: before anything
            conn = await self.ssh.open()
            try:
                await self.port.start()
                self.ssh.follow_moves = False  # no tunnel: the name resolves normally on reconnect
                self.ssh.attach(conn)
                self.control = await start_control(
                    _user_control_dir, self.status_document, self._stop.request
                )
                log.info(
                    "proxy up: SOCKS5 and HTTP CONNECT on %s via %s", self.port.where, self.ssh.server_label
                )
                self.ssh.spawn(self._status_loop())
                return self._stop.exit_code(await self.ssh.serve(self._stop.event))
            finally:
                if self.control is not None:
                    with contextlib.suppress(Exception):
                        await self.control.close()
                await self.port.close()
                await self.ssh.close()
                log.info("proxy down")

    def status_document(self) -> dict[str, Any]:
        """The same schema as the VPN's (x2ssh.status_report); no TUN, no routes, no DNS changes here."""
        counts = self.port.counts()
        up_bps, down_bps = self.rates.sample(counts.bytes_up, counts.bytes_down)
        return {
            **self.ssh.status_fields(),
            "tun": None,
            "routing": f"none (proxy on {self.port.where})",
            "dns": {"mode": "server", "backend": None},
            "kill_switch": False,
            "tcp": counts.tcp(),
            "bytes": {"up": counts.bytes_up, "down": counts.bytes_down},
            "rates": {"up_bps": up_bps, "down_bps": down_bps},
            "proxy": self.port.where,
        }

    async def _status_loop(self) -> None:
        elapsed = 0.0
        while True:
            await self.ssh.tick()
            counts = self.port.counts()
            self.rates.sample(counts.bytes_up, counts.bytes_down)
            await asyncio.sleep(STATUS_INTERVAL)
            elapsed += STATUS_INTERVAL
            if elapsed >= LOG_INTERVAL:
                elapsed = 0.0
                pool = self.ssh.pool.describe()
                log.info(
                    "status: %s, ssh %d conn, udp %d flows (%s), %d reconnects",
                    self.ssh.state,
                    len(pool),
                    self.ssh.relay.flow_count,
                    self.ssh.udp_mode,
                    self.ssh.reconnects,
                )


async def _user_control_dir() -> Path:
    """No helper and no root here: the socket goes in the user's own runtime directory."""
    return private_control_dir(user_run_dir())


def _endpoint(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
