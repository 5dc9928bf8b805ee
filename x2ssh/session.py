"""The SSH side of a run, shared by every front end: connect, pool, reconnect, agent, DNS.

A front end (the VPN's TUN, or the SOCKS proxy) hands flows to this core: TCP channels through `pool`,
UDP datagrams and pings through `relay` (the agent on the server), DNS through the agent or, without one,
DNS over TCP. The core keeps the SSH connection alive:
  - the first connection is made by `open()`; a bad host, key or password fails there, before the front end
    changes anything;
  - `serve()` waits until the connection is lost, then reconnects with capped exponential backoff and
    jitter (`--retry-*`), and returns when asked to stop or after `--retry-max` attempts;
  - a network change or a resume from suspend (`on_network_change`) checks the connection with one round
    trip at once, instead of waiting for keepalives;
  - the agent is re-attached after a reconnect when it kept its flows, else deployed anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncssh

from x2ssh import __version__
from x2ssh.agent_client.deploy import (
    AgentHandle,
    AgentSettings,
    AgentUnavailable,
    deploy_agent,
    reattach_agent,
)
from x2ssh.errors import SshAuthFailed, SshConnectError
from x2ssh.flows.dns_over_tcp import DnsOverTcp, lookup_name, server_resolver
from x2ssh.flows.udp_relay import DnsOverride, IcmpToApp, UdpRelay, UdpRelaySettings
from x2ssh.host.privileges import agent_hint
from x2ssh.settings import Settings
from x2ssh.ssh import tuning
from x2ssh.ssh.connect import ProxySettings, SocketFactory, connect_ssh, peer_endpoint, proxy_settings
from x2ssh.ssh.pool import AUTO_MAX_CONNECTIONS, ConnectionPool
from x2ssh.ssh.resolve_outside import nameservers, resolve_outside
from x2ssh.status_report import SCHEMA_VERSION, split_state

log = logging.getLogger(__name__)

Address = tuple[str, int]
UdpToApp = Callable[[Address, Address, bytes], None]
AGENT_RETRY_DELAY = 5.0
LIVENESS_TIMEOUT = 2.5  # a network change: how long the server may take to answer before we reconnect


class SshSession:
    """One server: its pool of SSH connections, the agent and the relays that ride them."""

    def __init__(
        self,
        settings: Settings,
        socket_factory: SocketFactory,
        udp_to_app: UdpToApp,
        *,
        icmp: IcmpToApp | None = None,
        dns_override: DnsOverride | None = None,
        tunnel_dns: frozenset[str] = frozenset(),
        on_attach: Callable[[], None] = lambda: None,
        on_detach: Callable[[], None] = lambda: None,
        on_connection: Callable[[asyncssh.SSHClientConnection], None] = lambda conn: None,
    ) -> None:
        """`on_connection` sees every SSH connection made (the first, reconnects, the pool's extra ones) as
        soon as it is up, before anything is sent on it."""
        self.settings = settings
        self._socket_factory = socket_factory
        self._on_attach = on_attach
        self._on_detach = on_detach
        self._on_connection = on_connection
        self._tunnel_dns = tunnel_dns
        self.conn: asyncssh.SSHClientConnection | None = None
        self.pool = ConnectionPool(
            lambda: self.connect(self.endpoint), settings.ssh_connections or AUTO_MAX_CONNECTIONS
        )
        self.relay = UdpRelay(udp_to_app, UdpRelaySettings(), dns_override=dns_override, icmp=icmp)
        self.dns_tcp = DnsOverTcp(lambda: self.conn, udp_to_app, self.real_dns)
        self.agent: AgentHandle | None = None
        self._lost_agent: AgentHandle | None = None  # lost with its connection: re-attach to it next time
        self.agent_unavailable: str | None = None
        self.server_dns: str | None = None
        self.endpoint: tuple[str, int] | None = None
        self.server_label = ""
        self.proxy: ProxySettings | None = None
        self.follow_moves = False  # the front end says whether a moved server may be followed
        self.original_nameservers: list[str] = []
        self.state = "connecting"
        self.errors: list[str] = []
        self.reconnects = 0
        self._checking = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- connecting --

    async def open(self) -> asyncssh.SSHClientConnection:
        """The first connection; raises SshConnectError (and friends) before anything else happens."""
        try:  # kept to find the server again if it moves while the tunnel (and its DNS) is down
            self.original_nameservers = nameservers(Path("/etc/resolv.conf").read_text())
        except OSError:
            self.original_nameservers = []
        conn = self.conn = await self.connect()
        server = peer_endpoint(conn)
        # Reconnect to this address: the name may not resolve while a tunnel (and its DNS) is down.
        self.endpoint = (str(server[0]), server[1]) if server else None
        s = self.settings
        self.server_label = f"{s.host or s.destination} ({server[0] if server else '?'})"
        return conn

    async def connect(self, endpoint: tuple[str, int] | None = None) -> asyncssh.SSHClientConnection:
        """One more connection to the server (the pool's extra connections come from here too)."""
        if self.proxy is None:
            self.proxy = proxy_settings(self.settings)  # refuses ProxyCommand before anything changes
        try:
            conn = await connect_ssh(self.settings, endpoint, self._socket_factory, self.proxy)
        except SshAuthFailed as exc:
            hint = agent_hint()
            if hint:
                raise SshAuthFailed(f"{exc.message}. {hint}") from None
            raise
        self._on_connection(conn)
        return conn

    def attach(self, conn: asyncssh.SSHClientConnection) -> None:
        """Carry flows over `conn` from now on; start (or re-attach) the agent on it."""
        self.conn = conn
        self.pool.set_primary(conn)
        self.state = "up"
        self._on_attach()
        self.spawn(self._agent_loop(conn))

    async def serve(self, stop: asyncio.Event) -> bool:
        """Keep the connection up until `stop` is set (True) or reconnecting gave up (False)."""
        assert self.conn is not None
        conn = self.conn
        while True:
            closed = asyncio.ensure_future(conn.wait_closed())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            stopped.cancel()
            if stop.is_set():
                return True
            self._detach("SSH connection lost")
            new = await self._reconnect(stop)
            if new is None:
                return stop.is_set()
            conn = new
            self.reconnects += 1
            self.attach(conn)
            log.info("reconnected to %s", self.server_label)

    def _detach(self, why: str) -> None:
        log.warning("%s: open flows are reset; new ones wait for the next connection", why)
        self.errors.append(f"{time.strftime('%H:%M:%S')} {why}")
        self.conn = None
        self.pool.set_primary(None)
        self._on_detach()
        if self.agent is not None:
            self.relay.detach()
            self.agent = None

    async def _reconnect(self, stop: asyncio.Event) -> asyncssh.SSHClientConnection | None:
        s = self.settings
        delay = s.retry_initial
        attempt = 0
        while s.retry_max is None or attempt < s.retry_max:
            attempt += 1
            self.state = f"reconnecting (attempt {attempt})"
            try:
                await self._follow_server_address()
                return await self.connect(self.endpoint)
            except SshConnectError as exc:
                log.warning("reconnect attempt %d failed: %s", attempt, exc.message)
            if s.retry_max is not None and attempt >= s.retry_max:
                break
            wait = min(delay, s.retry_max_delay) * random.uniform(0.8, 1.2)
            self.state = f"reconnecting (attempt {attempt}, next in {wait:.0f} s)"
            log.info("%s", self.state)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return None
            delay *= 2
        log.error("giving up after %d reconnect attempts (--retry-max)", attempt)
        return None

    async def _follow_server_address(self) -> None:
        """If the server's name now resolves elsewhere, reconnect to the new address.

        Asked of the machine's original resolvers on sockets from the socket factory (the VPN's bypass the
        tunnel, whose DNS is down with it). Only where the front end allows it (`follow_moves`): the VPN's
        split-route fallback pinned the old address, so there it is kept.
        """
        s = self.settings
        host = s.host or s.destination or ""
        if self.proxy is None or self.proxy.jump or self.endpoint is None or not self.follow_moves:
            return
        try:
            ipaddress.ip_address(host)
            return  # an address never moves
        except ValueError:
            pass
        found = await resolve_outside(host, self.original_nameservers, self._socket_factory)
        current = ipaddress.ip_address(self.endpoint[0])
        if not found or current in found:
            return
        new = next((a for a in found if a.version == current.version), found[0])
        log.info("%s now resolves to %s (was %s): reconnecting there", host, new, current)
        self.endpoint = (str(new), self.endpoint[1])

    # -- network changes --

    def on_network_change(self, reason: str) -> None:
        """A link, address or route changed, or the machine resumed: check the connection now."""
        if self.conn is not None and not self._checking:
            self.spawn(self._check_liveness(self.conn, reason))

    async def _check_liveness(self, conn: asyncssh.SSHClientConnection, reason: str) -> None:
        """Network changed: one round trip to the server, or drop the connection and reconnect now."""
        self._checking = True
        log.info("network change (%s): checking the SSH connection", reason)
        try:
            await asyncio.wait_for(tuning.ping(conn), LIVENESS_TIMEOUT)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            if self.conn is conn:
                log.warning("no answer from the server after the network change (%r): reconnecting", exc)
                conn.abort()
        else:
            log.info("the SSH connection survived the network change")
        finally:
            self._checking = False

    async def close(self) -> None:
        """Stop the tasks, close the agent, the pool's extra connections and the connection."""
        self.state = "stopping"
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()
        self.dns_tcp.close()
        if self.agent is not None:
            agent, self.agent = self.agent, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.close(), 10)
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.wait_closed(), 5)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` as a task owned by the session (cancelled by `close`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- UDP, ICMP and DNS from a front end --

    def udp_from_app(self, src: Address, dst: Address, payload: bytes) -> None:
        """A datagram from the app side: through the agent, or DNS over TCP while there is none."""
        if self.agent is None and dst[1] == 53 and self.settings.vpn_dns != "off":
            self.dns_tcp.query(src, dst, payload)
            return
        self.relay.datagram_from_app(src, dst, payload)

    def real_dns(self, dst: Address) -> Address:
        """Where DNS sent to the front end's own DNS addresses (`tunnel_dns`) really goes: the server's
        resolver (TCP from apps, and the DNS-over-TCP fallback); anything else goes where it was sent."""
        if dst[0] in self._tunnel_dns:
            return (self.server_dns or "127.0.0.1", dst[1])
        return dst

    async def tick(self) -> None:
        """Once a second: learn the server's resolver, expire idle UDP flows."""
        if self.conn is not None and self.server_dns is None and self.settings.vpn_dns == "remote":
            self.server_dns = await server_resolver(self.conn)
        self.relay.expire(time.monotonic())

    async def resolve(self, name: str) -> list[str]:
        """Addresses of `name` from the server's own resolver, asked over TCP through the connection."""
        conn = self.conn
        if conn is None:
            raise TimeoutError("no SSH connection")
        if self.server_dns is None:
            self.server_dns = await server_resolver(conn)
        return await lookup_name(conn, self.server_dns, name)

    def status_fields(self) -> dict[str, Any]:
        """The keys of the status document (x2ssh.status_report) that the SSH side knows; a front end adds
        its own (tun, routing, dns, kill_switch, tcp, bytes, rates)."""
        state, detail = split_state(self.state)
        endpoint = self.endpoint
        s = self.settings
        return {
            "schema": SCHEMA_VERSION,
            "state": state,
            "state_detail": detail,
            "server": {
                "name": s.host or s.destination or "",
                "address": endpoint[0] if endpoint else None,
                "port": endpoint[1] if endpoint else None,
            },
            "ssh_connections": [
                {"label": m["label"], "channels": m["channels"], "up_s": m["up_s"]}
                for m in self.pool.describe()
            ],
            "udp": {"flows": self.relay.flow_count},
            "agent": {"transport": self.agent.transport if self.agent else None},
            "reconnects": self.reconnects,
            "pid": os.getpid(),
            "version": __version__,
        }

    @property
    def udp_mode(self) -> str:
        if self.agent:
            return f"agent ({self.agent.transport})"
        return "DNS over TCP only" if self.agent_unavailable else "agent starting"

    # -- the agent --

    async def _agent_loop(self, conn: asyncssh.SSHClientConnection) -> None:
        """Keep a UDP agent attached for as long as `conn` lives. After a reconnect, re-attach to the agent
        the lost connection left (its flows keep their server-side ports); else deploy one; re-deploy when
        it dies."""
        settings = AgentSettings(reattach_grace=self.settings.agent_reattach_grace)
        while self.conn is conn and not conn.is_closed():
            previous, self._lost_agent = self._lost_agent, None
            resumed = False
            try:
                agent = None
                if previous is not None:
                    try:
                        agent = await reattach_agent(conn, previous, settings)
                        resumed = True
                    except AgentUnavailable as exc:
                        log.info("cannot re-attach to the UDP agent (%s): deploying a new one", exc.reason)
                if agent is None:
                    agent = await deploy_agent(conn, settings)
            except AgentUnavailable as exc:
                if self.agent_unavailable != exc.reason:
                    log.warning("UDP agent unavailable: %s", exc.reason)
                self.agent_unavailable = exc.reason
                self.relay.refuse_pings(f"no agent on the server ({exc.reason})")
                return
            except (asyncssh.Error, OSError) as exc:
                log.warning("UDP agent deployment failed: %s", exc)
                await asyncio.sleep(AGENT_RETRY_DELAY)
                continue
            if self.conn is not conn:
                await agent.close()
                return
            self.agent_unavailable = None
            self.agent = agent
            self.relay.attach(agent, resumed=resumed)
            await self._keep_agent_alive(agent, settings.keepalive_interval)
            if agent.lost:
                self._lost_agent = agent  # it keeps the flows for a while: the next connection re-attaches
            if self.agent is agent:
                self.relay.detach()
                self.agent = None
                if self.conn is conn and not conn.is_closed():
                    log.warning("UDP agent connection lost; re-attaching or re-deploying")
                    await asyncio.sleep(1)

    @staticmethod
    async def _keep_agent_alive(agent: AgentHandle, interval: float) -> None:
        """Until the agent link closes, tell the agent we are alive (it exits after a silent period)."""
        nonce = 0
        while not agent.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(agent.wait_closed(), interval)
            if not agent.closed:
                nonce += 1
                agent.send_keepalive(nonce)
