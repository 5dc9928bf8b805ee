"""One VPN run: connect, bring the tunnel up, carry traffic, heal the connection, and undo everything.

Order matters and is the whole safety story:
  1. connect and authenticate SSH first — a bad host, key or password fails before anything changes;
  2. every host change (TUN, routes, DNS) is journaled before it is made, so a crash is undone by
     `x2ssh --vpn-cleanup` or the next start;
  3. the SSH server (and ProxyJump hops) keep their original path, so the tunnel never carries itself;
  4. on a lost connection routes and DNS stay in place (nothing leaks out of the tunnel), new TCP flows wait
     for the next connection within a bound, and the flows that were open are reset;
  5. on exit (signal, --retry-max reached, fatal error) the journal is unwound in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import random
import signal
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
from x2ssh.errors import SshConnectError, X2sshError
from x2ssh.flows.dns_over_tcp import DnsOverTcp, server_resolver
from x2ssh.flows.icmp_to_tun import IcmpToTun
from x2ssh.flows.tcp_bridge import TcpBridge
from x2ssh.flows.udp_relay import DnsOverride, UdpRelay, UdpRelaySettings
from x2ssh.host.journal import StateJournal, journal_path
from x2ssh.host.linux.dns import DnsConfigurator, resolver_addresses
from x2ssh.host.linux.firewall import KillSwitch
from x2ssh.host.linux.routes import LinuxRouting, OriginalPath, PlannedRoute, RoutePlan, plan_routes
from x2ssh.host.linux.tun import DNS_V4, DNS_V6, TunDevice, open_tun
from x2ssh.settings import Settings
from x2ssh.ssh.connect import bypass_addresses, connect_ssh, peer_endpoint
from x2ssh.ssh.resolve_outside import nameservers, resolve_outside
from x2ssh.status import Snapshot, StatusView

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None)

Address = tuple[str, int]
TUNNEL_DNS = {str(DNS_V4), str(DNS_V6)}
STATUS_INTERVAL = 1.0
AGENT_RETRY_DELAY = 5.0


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise; a no-op elsewhere)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


async def run_vpn(settings: Settings) -> int:
    """Run the VPN until a signal or a final failure; returns the process exit code."""
    return await VpnSession(settings).run()


class VpnSession:
    """Owns the connection, the TUN and netstack, the bridge, the UDP relay and the host changes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.journal: StateJournal | None = None  # created once the connection is up: nothing before
        self.conn: asyncssh.SSHClientConnection | None = None
        self.tun: TunDevice | None = None
        self.tun_stack: TunStack | None = None
        self.bridge = TcpBridge(self._stack, rewrite=self._real_dns)
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
        self.kill_switch: KillSwitch | None = None
        self.routing: LinuxRouting | None = None
        self.server_path: OriginalPath | None = None  # how the server was reached before the VPN
        self.original_nameservers: list[str] = []
        self.state = "connecting"
        self.status = StatusView()
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._signal = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the whole run --

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            conn = self.conn = await connect_ssh(self.settings)
            try:
                await self._bring_up(conn)
                return await self._serve(conn)
            finally:
                await self._tear_down()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("%s received: restoring routes and DNS", signal.Signals(sig).name)
        self._signal = sig
        self._stop.set()

    async def _bring_up(self, conn: asyncssh.SSHClientConnection) -> None:
        s = self.settings
        self.journal = StateJournal(journal_path(s.state_dir, s.vpn_tun))
        bypass = await bypass_addresses(s, conn)
        server = peer_endpoint(conn)
        # Reconnect to this address: the name cannot be resolved while the tunnel (and its DNS) is down.
        self.endpoint = (str(server[0]), server[1]) if server else None
        self.server_label = f"{s.host or s.destination} ({server[0] if server else '?'})"
        self.tun = await asyncio.to_thread(open_tun, s.vpn_tun, s.vpn_mtu, journal=self.journal)
        self.tun_stack = TunStack(
            self.tun.fd,
            config=StackConfig(mtu=s.vpn_mtu),
            on_tcp=self.bridge.on_tcp,
            on_udp=self._on_udp,
            on_icmp=self._on_icmp,
        )
        self.tun_stack.start()
        routing = self.routing = LinuxRouting()
        if server:
            self.server_path = await asyncio.to_thread(routing.lookup_original, server[0])
        plan = await asyncio.to_thread(
            plan_routes, self.tun.name, bypass, list(s.vpn_exclude), routing.lookup_original
        )
        await asyncio.to_thread(routing.apply, plan, self.journal)
        try:  # kept to find the server again if it moves while the tunnel (and its DNS) is down
            self.original_nameservers = nameservers(Path("/etc/resolv.conf").read_text())
        except OSError:
            self.original_nameservers = []
        servers = resolver_addresses(s.vpn_dns)
        if servers:
            dns = DnsConfigurator(self.tun.name)
            await asyncio.to_thread(dns.apply, servers, self.journal)
        if s.vpn_kill_switch:
            self.kill_switch = KillSwitch(self.tun.name, [server] if server else [], list(s.vpn_exclude))
            await asyncio.to_thread(self.kill_switch.apply, self.journal)
            log.info("kill switch on: only the SSH connection and excluded prefixes bypass the tunnel")
        self._attach(conn)
        self.state = "up"
        log.info(
            "VPN up: %s via %s; bypassing %s; DNS %s",
            self.tun.name,
            self.server_label,
            ", ".join(map(str, bypass)) or "nothing",
            ", ".join(map(str, servers)) or "unchanged",
        )
        self.status.start()
        self._spawn(self._status_loop())

    def _attach(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.bridge.set_connection(conn)
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
            if self.kill_switch is not None and (ssh_endpoint := peer_endpoint(conn)) is not None:
                await asyncio.to_thread(self.kill_switch.update, [ssh_endpoint])
            self._attach(conn)
            self.state = "up"
            log.info("reconnected to %s", self.server_label)

    def _detach(self, why: str) -> None:
        log.warning("%s: open flows are reset; new ones wait for the next connection", why)
        self.errors.append(f"{time.strftime('%H:%M:%S')} {why}")
        self.conn = None
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
                return await connect_ssh(s, self.endpoint)
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
        """If the server's name now resolves elsewhere, pin the new address outside the tunnel and use it."""
        s = self.settings
        host = s.host or s.destination or ""
        if s.jump or self.endpoint is None or self.server_path is None or self.tun is None:
            return
        try:
            ipaddress.ip_address(host)
            return  # an address never moves
        except ValueError:
            pass
        found = await resolve_outside(host, self.original_nameservers, self.server_path.dev)
        current = ipaddress.ip_address(self.endpoint[0])
        if not found or current in found:
            return
        new = next((a for a in found if a.version == current.version), found[0])
        path = self.server_path
        plan = RoutePlan((PlannedRoute(ipaddress.ip_network(new), path.dev, path.gateway, "server"),))
        assert self.routing is not None and self.journal is not None
        await asyncio.to_thread(self.routing.apply, plan, self.journal)
        if self.kill_switch is not None:
            await asyncio.to_thread(self.kill_switch.update, [(new, self.endpoint[1])])
        log.info("%s now resolves to %s (was %s): its route outside the tunnel follows", host, new, current)
        self.endpoint = (str(new), self.endpoint[1])

    async def _tear_down(self) -> None:
        self.state = "stopping"
        self.status.stop()
        for task in list(self._tasks):
            task.cancel()
        self.bridge.close()
        self.dns_tcp.close()
        if self.tun_stack is not None:
            self.tun_stack.close()  # resets every app connection while the routes still point at us
            self.tun_stack = None
        if self.journal is not None:
            try:
                await asyncio.to_thread(self.journal.undo_all)  # DNS, routes, TUN record: reverse order
            except X2sshError as exc:
                log.error("%s", exc.message)
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
            errors=list(self.errors),
        )

    def _stack(self) -> TunStack:
        assert self.tun_stack is not None
        return self.tun_stack
