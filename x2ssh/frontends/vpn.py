"""The VPN front end: the machine's traffic from a TUN device, through netstack, onto the SSH session.

Order matters and is the whole safety story:
  1. connect and authenticate SSH first (`SshSession.open`) — a bad host, key or password fails before
     anything changes;
  2. every host change (TUN, routes, DNS, kill switch) is made by the privileged helper (`host`), which
     journals it first and undoes it when asked, when this process dies, or after a crash and reboot;
  3. the SSH connection's sockets carry x2ssh's firewall mark and follow the machine's own routes, so the
     tunnel never carries itself, also when the uplink changes under it;
  4. on a lost connection routes and DNS stay in place (nothing leaks out of the tunnel), new TCP flows wait
     for the next connection within a bound, and the flows that were open are reset; a network change or
     a resume from suspend checks the connection at once instead of waiting for keepalives;
  5. on exit (SIGINT, SIGTERM, SIGHUP, --retry-max reached, fatal error) the helper undoes everything.

With -D the SOCKS5/HTTP CONNECT proxy (`ProxyPort`) runs beside the TUN on the same session (pool, agent,
reconnection, status). This process runs as the user (the CLI gave up root after starting the helper), so
the proxy's port is the user's, as in `x2ssh -D`; it opens before the TUN (a taken port changes nothing)
and closes with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import socket
import sys
import time
from typing import Any

from netstack import IcmpEchoRequest, LocalProtocolError, StackConfig, UdpDatagram
from netstack.aio import TunStack
from x2ssh.control import ControlServer, start_control
from x2ssh.flows.icmp_to_tun import IcmpToTun
from x2ssh.flows.tcp_bridge import TcpBridge
from x2ssh.flows.udp_relay import DnsOverride
from x2ssh.frontends.proxy import ProxyCounts, ProxyPort
from x2ssh.frontends.stop import StopRequest
from x2ssh.host.api import DNS_V4, DNS_V6, HostControl, NetworkWatcher, TunDevice
from x2ssh.sd_notify import Notifier, watchdog_loop
from x2ssh.session import Address, SshSession
from x2ssh.settings import Settings
from x2ssh.ssh.connect import bypass_addresses
from x2ssh.ssh.tuning import flush_sends_with
from x2ssh.status import Snapshot, StatusView
from x2ssh.status_report import status_line

log = logging.getLogger("x2ssh.vpn")

STATUS_INTERVAL = 1.0


def _find_malloc_trim() -> Any:
    """glibc's malloc_trim, or None: the process's own C library (CDLL(None)) exists only on POSIX, and
    only glibc has malloc_trim (musl, macOS and Windows have no such call)."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


_malloc_trim = _find_malloc_trim()


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


async def run_vpn(settings: Settings, host: HostControl, notifier: Notifier | None = None) -> int:
    """Run the VPN until a signal or a final failure; returns the process exit code."""
    return await VpnSession(settings, host, notifier).run()


class VpnSession:
    """Owns the TUN and netstack and the TCP bridge; asks `host` for host changes and `ssh` for flows."""

    def __init__(self, settings: Settings, host: HostControl, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.host = host
        self.notifier = notifier or Notifier()
        self.control: ControlServer | None = None
        self._rate_mark = (time.monotonic(), 0, 0)  # when, bytes up, bytes down: rates are taken from here
        self._rates = (0.0, 0.0)  # bits/s up, down
        self.tun: TunDevice | None = None
        self.tun_stack: TunStack | None = None
        remote_dns = settings.vpn_dns == "remote"
        tunnel_dns = (str(DNS_V4), str(DNS_V6))
        self.ssh = SshSession(
            settings,
            host.marked_socket,
            self._udp_to_app,
            icmp=IcmpToTun(lambda: self.tun_stack),
            dns_override=DnsOverride(tuple((a, 53) for a in tunnel_dns)) if remote_dns else None,
            tunnel_dns=frozenset(tunnel_dns) if remote_dns else frozenset(),
            on_attach=self._on_attach,
            on_detach=self._on_detach,
            on_connection=self._on_connection,
        )
        self.bridge = TcpBridge(self._stack, rewrite=self.ssh.real_dns)
        self.proxy = ProxyPort(settings, self.ssh) if settings.dynamic is not None else None
        self.routing_mode = ""
        self.dns_backend = ""
        self.status = StatusView()
        self.netwatch: NetworkWatcher | None = None
        self._stop = StopRequest("restoring routes and DNS")

    async def run(self) -> int:
        watchdog = asyncio.get_running_loop().create_task(watchdog_loop(self.notifier))
        try:
            with self._stop:
                conn = await self.ssh.open()
                try:
                    await self._bring_up(conn)
                    return self._stop.exit_code(await self.ssh.serve(self._stop.event))
                finally:
                    await self._tear_down()
        finally:
            watchdog.cancel()

    async def _bring_up(self, conn: object) -> None:
        s = self.settings
        if self.proxy is not None:
            await self.proxy.start()  # a taken port fails here, before the TUN, routes or DNS change
        self.tun = await self.host.open_tun()
        self.tun_stack = TunStack(
            self.tun.packet_port(),  # a TUN fd on Linux, the Wintun port on Windows
            config=StackConfig(
                mtu=self.tun.mtu,
                buffer_budget=self.settings.vpn_buffer_budget << 20,
                verify_checksums=False,  # the TUN's packets come from this machine's kernel
            ),
            on_tcp=self.bridge.on_tcp,
            on_udp=self._on_udp,
            on_icmp=self._on_icmp,
        )
        self._on_connection(conn)  # (made before the stack existed)
        self.tun_stack.start()
        assert self.ssh.proxy is not None
        bypass = await bypass_addresses(s, conn, self.ssh.proxy.jump)  # type: ignore[arg-type]
        self.routing_mode = await self.host.routes(bypass)
        self.ssh.follow_moves = self.routing_mode == "policy"  # split routes pinned the old address
        servers = [ipaddress.ip_address(DNS_V4)] if s.vpn_dns == "remote" else []
        if s.vpn_dns not in ("remote", "off"):
            servers = [s.vpn_dns]  # type: ignore[list-item]
        if servers:
            self.dns_backend = await self.host.dns(servers)
        if s.vpn_kill_switch:
            await self.host.kill_switch()
            log.info("kill switch on: only the tunnel and x2ssh's own SSH connection may leave the machine")
        self.ssh.attach(conn)  # type: ignore[arg-type]
        self.netwatch = self.host.network_watch(self.ssh.on_network_change, self._tunnel_ifindexes)
        self.netwatch.start()
        log.info(
            "VPN up: %s via %s; routing %s; DNS %s",
            self.tun.name,
            self.ssh.server_label,
            self.routing_mode,
            ", ".join(map(str, servers)) + f" ({self.dns_backend})" if servers else "unchanged",
        )
        if self.proxy is not None:
            log.info("proxy up: SOCKS5 and HTTP CONNECT on %s, beside the VPN", self.proxy.where)
        self.control = await start_control(self.host.run_dir, self.status_document, self._stop.request)
        self.status.start()
        self.notifier.ready()  # routes, DNS and the connection are in place: traffic flows from here on
        self.notifier.status(status_line(self.status_document()))
        self.ssh.spawn(self._status_loop())

    def _tunnel_ifindexes(self) -> set[int]:
        if self.tun is None:
            return set()
        try:
            return {socket.if_nametoindex(self.tun.name)}
        except OSError:
            return set()

    async def _tear_down(self) -> None:
        self.notifier.stopping()
        self.status.stop()
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.close()
        if self.netwatch is not None:
            self.netwatch.close()
        if self.proxy is not None:
            await self.proxy.close()
        self.bridge.close()
        if self.tun_stack is not None:
            self.tun_stack.close()  # resets every app connection while the routes still point at us
            self.tun_stack = None
        try:
            for item in await asyncio.to_thread(self.host.down):  # DNS, firewall, routes, TUN: newest first
                log.debug("undone: %s", item)
        except Exception as exc:
            log.error("could not restore everything: %s (run x2ssh --vpn-cleanup)", exc)
        await self.ssh.close()
        if self.tun is not None:
            self.tun.close()
        log.info("VPN down: routes and DNS restored")

    # -- packets from the TUN --

    def _on_udp(self, datagram: UdpDatagram) -> None:
        self.ssh.udp_from_app(datagram.src, datagram.dst, datagram.payload)

    def _on_icmp(self, request: IcmpEchoRequest) -> None:
        self.ssh.relay.echo_from_app(request.src, request.dst, request.ident, request.seq, request.payload)

    def _on_connection(self, conn: object) -> None:
        # What apps send is written to the channels while the netstack delivers a batch: each SSH
        # connection's gathered packets leave at the end of that batch, not a loop turn later. Set once per
        # connection (the bridge's flows need not ask).
        if self.tun_stack is not None:
            flush_sends_with(conn, self.tun_stack.defer)

    def _on_attach(self) -> None:
        self.bridge.set_connection(self.ssh.pool)  # type: ignore[arg-type]
        if self.proxy is not None:
            self.proxy.on_attach()

    def _on_detach(self) -> None:
        self.bridge.set_connection(None)
        if self.proxy is not None:
            self.proxy.on_detach()

    def _udp_to_app(self, src: Address, dst: Address, payload: bytes) -> None:
        """A datagram from the agent: to the proxy's UDP association it was sent from, else into the TUN.
        (An association's address and an app's are both local UDP sockets of this host: never the same.)"""
        if self.proxy is not None and self.proxy.takes_udp(dst):
            self.proxy.udp_to_app(src, dst, payload)
            return
        if self.tun_stack is None:
            return
        try:
            self.tun_stack.udp_send(src, dst, payload)
        except LocalProtocolError as exc:
            log.debug("UDP reply of %d bytes not delivered: %s", len(payload), exc)

    def _stack(self) -> TunStack:
        assert self.tun_stack is not None
        return self.tun_stack

    # -- status --

    async def _status_loop(self) -> None:
        busy = False
        while True:
            active = self.bridge.stats.active + self.ssh.relay.flow_count
            if busy and active == 0:
                release_free_memory()  # a burst of flows is over: give its buffers back to the system
            busy = active > 0
            await self.ssh.tick()
            self.status.update(self.snapshot())
            self.notifier.status(status_line(self.status_document()))
            await asyncio.sleep(STATUS_INTERVAL)

    def status_document(self) -> dict[str, Any]:
        """The status document of `x2ssh status --json` (schema in x2ssh.status_report)."""
        snap = self.snapshot()
        now = time.monotonic()
        when, last_up, last_down = self._rate_mark
        if now - when >= 1.0:
            bits = 8 / (now - when)
            self._rates = ((snap.bytes_up - last_up) * bits, (snap.bytes_down - last_down) * bits)
            self._rate_mark = (now, snap.bytes_up, snap.bytes_down)
        up_bps, down_bps = self._rates
        s = self.settings
        return {
            **self.ssh.status_fields(),
            "tun": {"name": self.tun.name, "mtu": self.tun.mtu} if self.tun else None,
            "routing": self.routing_mode,
            "dns": {"mode": str(s.vpn_dns), "backend": self.dns_backend or None},
            "kill_switch": s.vpn_kill_switch,
            "tcp": {
                "open": snap.tcp_active,
                "total": snap.tcp_opened,
                "refused": snap.tcp_refused,
                "failed": snap.tcp_failed,
            },
            "bytes": {"up": snap.bytes_up, "down": snap.bytes_down},
            "rates": {"up_bps": up_bps, "down_bps": down_bps},
            "proxy": self.proxy.where if self.proxy is not None else None,
        }

    def snapshot(self) -> Snapshot:
        """The TUN's flows and the proxy's (when -D runs beside) together; UDP is the relay's, shared."""
        b = self.bridge.stats
        ssh = self.ssh
        r = ssh.relay.stats
        pool = ssh.pool.describe()
        proxy = self.proxy.counts() if self.proxy is not None else ProxyCounts()
        return Snapshot(
            state=ssh.state,
            server=ssh.server_label,
            tcp_active=b.active + proxy.open,
            tcp_opened=b.opened + proxy.total,
            tcp_refused=b.refused + proxy.refused,
            tcp_failed=b.failed + proxy.failed,
            udp_flows=ssh.relay.flow_count,
            udp_mode=ssh.udp_mode,
            bytes_up=b.bytes_up + r.bytes_to_agent + proxy.bytes_up,
            bytes_down=b.bytes_down + r.bytes_to_app + proxy.bytes_down,
            drops=sum(r.drops.values()),
            ssh_connections=len(pool),
            ssh_channels=tuple(m["channels"] for m in pool),
            pool_refusals=ssh.pool.capacity_refusals,
            errors=list(ssh.errors),
        )
