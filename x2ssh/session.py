"""One VPN run: connect, bring the tunnel up, carry traffic, heal the connection, and undo everything.

Order matters and is the whole safety story:
  1. connect and authenticate SSH first — a bad host, key or password fails before anything changes;
  2. every host change (TUN, routes, DNS, kill switch) is made by the privileged helper (`host`), which
     journals it first and undoes it when asked, when this process dies, or after a crash and reboot;
  3. the SSH connection's sockets carry x2ssh's firewall mark and follow the machine's own routes, so the
     tunnel never carries itself, also when the uplink changes under it;
  4. on a lost connection routes and DNS stay in place (nothing leaks out of the tunnel), new TCP flows wait
     for the next connection within a bound, and the flows that were open are reset; a network change or
     a resume from suspend checks the connection at once instead of waiting for keepalives;
  5. on exit (SIGINT, SIGTERM, SIGHUP, --retry-max reached, fatal error) the helper undoes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import random
import signal
import socket
import time
from pathlib import Path

import asyncssh

from netstack import IcmpEchoRequest, LocalProtocolError, StackConfig, UdpDatagram
from netstack.aio import TunStack
from x2ssh.agent_client.deploy import (
    AgentHandle,
    AgentSettings,
    AgentUnavailable,
    deploy_agent,
    reattach_agent,
)
from x2ssh.errors import SshAuthFailed, SshConnectError
from x2ssh.flows.dns_over_tcp import DnsOverTcp, server_resolver
from x2ssh.flows.icmp_to_tun import IcmpToTun
from x2ssh.flows.tcp_bridge import TcpBridge
from x2ssh.flows.udp_relay import DnsOverride, UdpRelay, UdpRelaySettings
from x2ssh.host.api import DNS_V4, DNS_V6, HostControl, NetworkWatcher, TunHandle
from x2ssh.host.privileges import agent_hint
from x2ssh.settings import Settings
from x2ssh.ssh import tuning
from x2ssh.ssh.connect import ProxySettings, bypass_addresses, connect_ssh, peer_endpoint, proxy_settings
from x2ssh.ssh.pool import AUTO_MAX_CONNECTIONS, ConnectionPool
from x2ssh.ssh.resolve_outside import nameservers, resolve_outside
from x2ssh.status import Snapshot, StatusView

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None)

Address = tuple[str, int]
TUNNEL_DNS = {str(DNS_V4), str(DNS_V6)}
STATUS_INTERVAL = 1.0
AGENT_RETRY_DELAY = 5.0
LIVENESS_TIMEOUT = 2.5  # a network change: how long the server may take to answer before we reconnect
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise; a no-op elsewhere)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


async def run_vpn(settings: Settings, host: HostControl) -> int:
    """Run the VPN until a signal or a final failure; returns the process exit code."""
    return await VpnSession(settings, host).run()


class VpnSession:
    """Owns the connection, the TUN and netstack, the bridge and the UDP relay; asks `host` for changes."""

    def __init__(self, settings: Settings, host: HostControl) -> None:
        self.settings = settings
        self.host = host
        self.conn: asyncssh.SSHClientConnection | None = None
        self.tun: TunHandle | None = None
        self.tun_stack: TunStack | None = None
        self.bridge = TcpBridge(self._stack, rewrite=self._real_dns)
        self.pool = ConnectionPool(
            lambda: self._connect(self.endpoint), settings.ssh_connections or AUTO_MAX_CONNECTIONS
        )
        remote_dns = settings.vpn_dns == "remote"
        override = DnsOverride(((str(DNS_V4), 53), (str(DNS_V6), 53))) if remote_dns else None
        self.relay = UdpRelay(
            self._udp_to_app,
            UdpRelaySettings(),
            dns_override=override,
            icmp=IcmpToTun(lambda: self.tun_stack),
        )
        self.dns_tcp = DnsOverTcp(lambda: self.conn, self._udp_to_app, self._real_dns)
        self.agent: AgentHandle | None = None
        self._lost_agent: AgentHandle | None = None  # lost with its connection: re-attach to it next time
        self.agent_unavailable: str | None = None
        self.server_dns: str | None = None
        self.endpoint: tuple[str, int] | None = None
        self.proxy: ProxySettings | None = None
        self.routing_mode = ""
        self.dns_backend = ""
        self.original_nameservers: list[str] = []
        self.state = "connecting"
        self.status = StatusView()
        self.errors: list[str] = []
        self.netwatch: NetworkWatcher | None = None
        self._stop = asyncio.Event()
        self._signal = 0
        self._checking = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the whole run --

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            conn = self.conn = await self._connect()
            try:
                await self._bring_up(conn)
                return await self._serve(conn)
            finally:
                await self._tear_down()
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("%s received: restoring routes and DNS", signal.Signals(sig).name)
        self._signal = sig
        self._stop.set()

    async def _connect(self, endpoint: tuple[str, int] | None = None) -> asyncssh.SSHClientConnection:
        if self.proxy is None:
            self.proxy = proxy_settings(self.settings)  # refuses ProxyCommand before anything changes
        try:
            return await connect_ssh(self.settings, endpoint, self.host.marked_socket, self.proxy)
        except SshAuthFailed as exc:
            hint = agent_hint()
            if hint:
                raise SshAuthFailed(f"{exc.message}. {hint}") from None
            raise

    async def _bring_up(self, conn: asyncssh.SSHClientConnection) -> None:
        s = self.settings
        assert self.proxy is not None
        server = peer_endpoint(conn)
        # Reconnect to this address: the name cannot be resolved while the tunnel (and its DNS) is down.
        self.endpoint = (str(server[0]), server[1]) if server else None
        self.server_label = f"{s.host or s.destination} ({server[0] if server else '?'})"
        try:  # kept to find the server again if it moves while the tunnel (and its DNS) is down
            self.original_nameservers = nameservers(Path("/etc/resolv.conf").read_text())
        except OSError:
            self.original_nameservers = []
        self.tun = await self.host.open_tun()
        self.tun_stack = TunStack(
            self.tun.fd,
            config=StackConfig(mtu=self.tun.mtu),
            on_tcp=self.bridge.on_tcp,
            on_udp=self._on_udp,
            on_icmp=self._on_icmp,
        )
        self.tun_stack.start()
        bypass = await bypass_addresses(s, conn, self.proxy.jump)
        self.routing_mode = await self.host.routes(bypass)
        servers = [ipaddress.ip_address(DNS_V4)] if s.vpn_dns == "remote" else []
        if s.vpn_dns not in ("remote", "off"):
            servers = [s.vpn_dns]  # type: ignore[list-item]
        if servers:
            self.dns_backend = await self.host.dns(servers)
        if s.vpn_kill_switch:
            await self.host.kill_switch()
            log.info("kill switch on: only the tunnel and x2ssh's own SSH connection may leave the machine")
        self._attach(conn)
        self.state = "up"
        self.netwatch = self.host.network_watch(self._on_network_change, self._tunnel_ifindexes)
        self.netwatch.start()
        log.info(
            "VPN up: %s via %s; routing %s; DNS %s",
            self.tun.name,
            self.server_label,
            self.routing_mode,
            ", ".join(map(str, servers)) + f" ({self.dns_backend})" if servers else "unchanged",
        )
        self.status.start()
        self._spawn(self._status_loop())

    def _attach(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.pool.set_primary(conn)
        self.bridge.set_connection(self.pool)  # type: ignore[arg-type]  # opens channels like a connection
        self._spawn(self._agent_loop(conn))

    async def _serve(self, conn: asyncssh.SSHClientConnection) -> int:
        while True:
            closed = asyncio.ensure_future(conn.wait_closed())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            stop.cancel()
            if self._stop.is_set():
                return 128 + self._signal if self._signal else 0
            self._detach("SSH connection lost")
            new = await self._reconnect()
            if new is None:
                return 1 if not self._stop.is_set() else 128 + self._signal
            conn = new
            self._attach(conn)
            self.state = "up"
            log.info("reconnected to %s", self.server_label)

    def _detach(self, why: str) -> None:
        log.warning("%s: open flows are reset; new ones wait for the next connection", why)
        self.errors.append(f"{time.strftime('%H:%M:%S')} {why}")
        self.conn = None
        self.pool.set_primary(None)
        self.bridge.set_connection(None)
        if self.agent is not None:
            self.relay.detach()
            self.agent = None

    async def _reconnect(self) -> asyncssh.SSHClientConnection | None:
        s = self.settings
        delay = s.retry_initial
        attempt = 0
        while s.retry_max is None or attempt < s.retry_max:
            attempt += 1
            self.state = f"reconnecting (attempt {attempt})"
            try:
                await self._follow_server_address()
                return await self._connect(self.endpoint)
            except SshConnectError as exc:
                log.warning("reconnect attempt %d failed: %s", attempt, exc.message)
            if s.retry_max is not None and attempt >= s.retry_max:
                break
            wait = min(delay, s.retry_max_delay) * random.uniform(0.8, 1.2)
            self.state = f"reconnecting (attempt {attempt}, next in {wait:.0f} s)"
            log.info("%s", self.state)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)
            if self._stop.is_set():
                return None
            delay *= 2
        log.error("giving up after %d reconnect attempts (--retry-max)", attempt)
        return None

    async def _follow_server_address(self) -> None:
        """If the server's name now resolves elsewhere, reconnect to the new address.

        Asked of the machine's original resolvers on marked sockets (outside the tunnel, whose DNS is down
        with it). Policy routing needs no route for the new address; the split-route fallback pinned only
        the old one, so there the address is kept.
        """
        s = self.settings
        host = s.host or s.destination or ""
        if self.proxy is None or self.proxy.jump or self.endpoint is None or self.routing_mode != "policy":
            return
        try:
            ipaddress.ip_address(host)
            return  # an address never moves
        except ValueError:
            pass
        found = await resolve_outside(host, self.original_nameservers, self.host.marked_socket)
        current = ipaddress.ip_address(self.endpoint[0])
        if not found or current in found:
            return
        new = next((a for a in found if a.version == current.version), found[0])
        log.info("%s now resolves to %s (was %s): reconnecting there", host, new, current)
        self.endpoint = (str(new), self.endpoint[1])

    # -- network changes --

    def _tunnel_ifindexes(self) -> set[int]:
        if self.tun is None:
            return set()
        try:
            return {socket.if_nametoindex(self.tun.name)}
        except OSError:
            return set()

    def _on_network_change(self, reason: str) -> None:
        if self.conn is not None and not self._checking:
            self._spawn(self._check_liveness(self.conn, reason))

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

    async def _tear_down(self) -> None:
        self.state = "stopping"
        self.status.stop()
        if self.netwatch is not None:
            self.netwatch.close()
        for task in list(self._tasks):
            task.cancel()
        self.bridge.close()
        self.pool.close()
        self.dns_tcp.close()
        if self.tun_stack is not None:
            self.tun_stack.close()  # resets every app connection while the routes still point at us
            self.tun_stack = None
        try:
            for item in await asyncio.to_thread(self.host.down):  # DNS, firewall, routes, TUN: newest first
                log.debug("undone: %s", item)
        except Exception as exc:
            log.error("could not restore everything: %s (run x2ssh --vpn-cleanup)", exc)
        if self.agent is not None:
            agent, self.agent = self.agent, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.close(), 10)
        if self.tun is not None:
            self.tun.close()
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.wait_closed(), 5)
        log.info("VPN down: routes and DNS restored")

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- UDP --

    def _on_udp(self, datagram: UdpDatagram) -> None:
        if self.agent is None and datagram.dst[1] == 53 and self.settings.vpn_dns != "off":
            self.dns_tcp.query(datagram.src, datagram.dst, datagram.payload)
            return
        self.relay.datagram_from_app(datagram.src, datagram.dst, datagram.payload)

    def _on_icmp(self, request: IcmpEchoRequest) -> None:
        self.relay.echo_from_app(request.src, request.dst, request.ident, request.seq, request.payload)

    def _udp_to_app(self, src: Address, dst: Address, payload: bytes) -> None:
        if self.tun_stack is None:
            return
        try:
            self.tun_stack.udp_send(src, dst, payload)
        except LocalProtocolError as exc:
            log.debug("UDP reply of %d bytes not delivered: %s", len(payload), exc)

    async def _agent_loop(self, conn: asyncssh.SSHClientConnection) -> None:
        """Keep a UDP agent attached for as long as `conn` lives. After a reconnect, re-attach to the agent
        the lost connection left (its flows keep their server-side ports); else deploy one; re-deploy when
        it dies."""
        settings = AgentSettings()
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

    # -- DNS --

    def _real_dns(self, dst: Address) -> Address:
        """Where DNS sent to the tunnel's own DNS address really goes (TCP from apps, and the DNS-over-TCP
        fallback): the server's resolver with `--vpn-dns remote`; anything else goes where it was sent."""
        if dst[0] in TUNNEL_DNS and self.settings.vpn_dns == "remote":
            return (self.server_dns or "127.0.0.1", dst[1])
        return dst

    # -- status --

    async def _status_loop(self) -> None:
        busy = False
        while True:
            active = self.bridge.stats.active + self.relay.flow_count
            if busy and active == 0:
                release_free_memory()  # a burst of flows is over: give its buffers back to the system
            busy = active > 0
            if self.conn is not None and self.server_dns is None and self.settings.vpn_dns == "remote":
                self.server_dns = await server_resolver(self.conn)
            self.relay.expire(time.monotonic())
            self.status.update(self.snapshot())
            await asyncio.sleep(STATUS_INTERVAL)

    def snapshot(self) -> Snapshot:
        b = self.bridge.stats
        r = self.relay.stats
        udp_mode = (
            f"agent ({self.agent.transport})"
            if self.agent
            else ("DNS over TCP only" if self.agent_unavailable else "agent starting")
        )
        return Snapshot(
            state=self.state,
            server=getattr(self, "server_label", ""),
            tcp_active=b.active,
            tcp_opened=b.opened,
            tcp_refused=b.refused,
            tcp_failed=b.failed,
            udp_flows=self.relay.flow_count,
            udp_mode=udp_mode,
            bytes_up=b.bytes_up + r.bytes_to_agent,
            bytes_down=b.bytes_down + r.bytes_to_app,
            drops=sum(r.drops.values()),
            ssh_connections=len(pool := self.pool.describe()),
            ssh_channels=tuple(m["channels"] for m in pool),
            pool_refusals=self.pool.capacity_refusals,
            errors=list(self.errors),
        )

    def _stack(self) -> TunStack:
        assert self.tun_stack is not None
        return self.tun_stack
