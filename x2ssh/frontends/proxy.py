"""`x2ssh -D [bind_address:]port DESTINATION`: the SOCKS5 and HTTP CONNECT proxy as a run of its own.

No root and no TUN: the proxy hands its TCP flows to the session's connection pool, names to the server's
own resolver (asked over TCP through the connection, so sshd never blocks on a lookup), and UDP ASSOCIATE
datagrams to the agent. The SSH side reconnects as in VPN mode; the proxy keeps listening meanwhile and new
requests wait (bounded) for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from x2ssh.control import ControlServer, private_control_dir, start_control, user_run_dir
from x2ssh.frontends.socks import SocksServer, check_bind
from x2ssh.frontends.socks_backend import SshChannelBackend
from x2ssh.frontends.socks_protocol import Credentials
from x2ssh.frontends.stop import StopRequest
from x2ssh.session import Address, SshSession
from x2ssh.settings import Settings
from x2ssh.ssh.connect import plain_socket
from x2ssh.status import RateMeter

log = logging.getLogger("x2ssh.proxy")

CONNECTION_WAIT = 15.0  # how long a new request waits for the SSH connection while it reconnects
STATUS_INTERVAL = 1.0
LOG_INTERVAL = 60.0


async def run_proxy(settings: Settings) -> int:
    """Serve the proxy until a signal or a final failure; returns the process exit code."""
    return await ProxyRun(settings).run()


class ProxyRun:
    """The session plus the proxy server on top of it."""

    def __init__(self, settings: Settings) -> None:
        assert settings.dynamic is not None
        self.settings = settings
        self._attached = asyncio.Event()
        self.ssh = SshSession(
            settings,
            plain_socket,
            self._udp_to_app,
            on_attach=self._attached.set,
            on_detach=self._attached.clear,
        )
        credentials = (
            Credentials(settings.socks_username, settings.socks_password)
            if settings.socks_username is not None and settings.socks_password is not None
            else None
        )
        backend = SshChannelBackend(self._pool, self.ssh.resolve, self.ssh.udp_from_app)
        host, port = settings.dynamic
        self.server = SocksServer(backend, host, port, credentials=credentials, allow_lan=settings.allow_lan)
        self.control: ControlServer | None = None
        self.rates = RateMeter()  # sampled each status tick, as the VPN's status loop does
        self._stop = StopRequest("stopping")

    async def run(self) -> int:
        with self._stop:
            s = self.server
            check_bind(s.host, s.credentials, s.allow_lan)  # a LAN bind without credentials: before anything
            conn = await self.ssh.open()
            try:
                await self.server.start()
                self.ssh.follow_moves = False  # no tunnel: the name resolves normally on reconnect
                self.ssh.attach(conn)
                self.control = await start_control(
                    _user_control_dir, self.status_document, self._stop.request
                )
                where = ", ".join(_endpoint(a) for a in self.server.addresses)
                log.info("proxy up: SOCKS5 and HTTP CONNECT on %s via %s", where, self.ssh.server_label)
                self.ssh.spawn(self._status_loop())
                return self._stop.exit_code(await self.ssh.serve(self._stop.event))
            finally:
                if self.control is not None:
                    with contextlib.suppress(Exception):
                        await self.control.close()
                with contextlib.suppress(Exception):
                    await self.server.close()
                await self.ssh.close()
                log.info("proxy down")

    def status_document(self) -> dict[str, Any]:
        """The same schema as the VPN's (x2ssh.status_report); no TUN, no routes, no DNS changes here."""
        stats = self.server.stats
        up_bps, down_bps = self.rates.sample(stats.bytes_up, stats.bytes_down)
        return {
            **self.ssh.status_fields(),
            "tun": None,
            "routing": "none (proxy on " + ", ".join(_endpoint(a) for a in self.server.addresses) + ")",
            "dns": {"mode": "server", "backend": None},
            "kill_switch": False,
            "tcp": {
                "open": stats.active,
                "total": stats.clients,
                "refused": stats.replies.get("CONNECTION_REFUSED", 0),
                "failed": stats.protocol_errors,
            },
            "bytes": {"up": stats.bytes_up, "down": stats.bytes_down},
            "rates": {"up_bps": up_bps, "down_bps": down_bps},
        }

    async def _pool(self) -> Any:
        """Where channels open: the pool, once a connection is there (bounded wait while reconnecting)."""
        if not self._attached.is_set():
            await asyncio.wait_for(self._attached.wait(), CONNECTION_WAIT)
        return self.ssh.pool

    def _udp_to_app(self, src: Address, dst: Address, payload: bytes) -> None:
        self.server.udp_from_remote(src, dst, payload)

    async def _status_loop(self) -> None:
        elapsed = 0.0
        while True:
            await self.ssh.tick()
            stats = self.server.stats
            self.rates.sample(stats.bytes_up, stats.bytes_down)
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
