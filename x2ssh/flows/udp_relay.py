"""Client side of UDP and ping: maps the apps' datagrams and echo requests onto agent flows and back.

Theory of operation (sans-IO): the netstack hands every outgoing UDP datagram to `datagram_from_app()`.
A flow is keyed by the app's (source, destination) pair; the first datagram of a flow assigns a flow id
and opens it on the agent, later ones only send. Replies arrive through `datagram_from_agent()` with the
address they came from and are handed to `send_to_app(src=that address, dst=the app's address)`, so a
reply from another port still reaches the app. Datagrams to a tunnel DNS address are sent to the real
resolver (the server's own by default) and their replies appear to come from the tunnel DNS address.

A DNS flow ends as soon as every query it carried has been answered (the query ids match), so lookups
per second are not bounded by the flow cap; other flows expire after `idle_timeout` of silence (DNS ones
that get no answer after `dns_idle_timeout`): the caller drives time through `expire(now)` and
`next_deadline()`. Flows live in two recency-ordered dicts (DNS and others), so both calls only look at the
oldest flows. Nothing is queued here: without an agent, beyond the flow cap or when the agent link pushes
back, a datagram is dropped and counted in `stats.drops`.

ICMP (protocol v2 agents): an app's echo request becomes an echo flow keyed by (app, target, identifier);
the agent pings from an unprivileged ping socket and the real reply comes back. Unreachable reports become
ICMP destination-unreachable errors to the app (`IcmpToApp`), so a connected UDP socket gets ECONNREFUSED
at once. Where the server may not ping, the app gets "administratively prohibited" at once (never a fake
reply) and the reason, worded for the server's OS (`ping_refusal_reason`), is logged once.

Re-attach: `detach()` keeps the flows (their server-side sockets live on in an agent that waits for a
re-attach); `attach(agent, resumed=True)` carries on with them, `attach(agent)` starts fresh.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from agent import protocol as p
from agent.protocol import MAX_PAYLOAD, SERVER_RESOLVER

log = logging.getLogger(__name__)

Address = tuple[str, int]
SendToApp = Callable[[Address, Address, bytes], None]

__all__ = [
    "SERVER_RESOLVER",
    "AgentLink",
    "DnsOverride",
    "IcmpToApp",
    "UdpRelay",
    "UdpRelaySettings",
    "UdpRelayStats",
    "ping_refusal_reason",
]

MAX_DNS_QUERIES = 64  # outstanding query ids tracked per DNS flow
# A busy flow's activity time is refreshed (and its place in the recency order) at most this often (clock
# units): idle timeouts are many seconds, and at 1 Gbit/s a flow carries ~90,000 datagrams a second.
RECENCY_STEP = 0.25


class IcmpToApp(Protocol):
    """Where ICMP for the apps goes (the netstack, which writes the packets to the TUN)."""

    def echo_reply(self, target: str, app: str, ident: int, seq: int, payload: bytes) -> None:
        """Deliver the real echo reply of `target` to `app` (identifier and sequence as the app sent)."""

    def unreachable(self, reporter: str, app: Address, dst: Address, code: int, echo: bool) -> None:
        """Tell `app` its packet to `dst` was undeliverable (`code`: agent.protocol.UNREACH_*), as
        `reporter` would. For echo flows the ports are the identifier and the sequence number."""


class ServerPlatform(Protocol):
    """What the relay needs to know about the server's python (`agent_client.link.ServerPython`)."""

    @property
    def platform(self) -> str:
        """`sys.platform` on the server: "linux", "win32", "darwin"..."""


class AgentLink(Protocol):
    """What the relay needs from an agent connection (`agent_client.deploy.AgentHandle` implements it)."""

    @property
    def python(self) -> ServerPlatform: ...

    def set_receiver(self, receiver: UdpRelay | None) -> None: ...
    def open_flow(self, flow_id: int, destination: Address) -> None: ...
    def send_datagram(self, flow_id: int, payload: bytes) -> bool: ...
    def close_flow(self, flow_id: int) -> None: ...
    @property
    def supports_icmp(self) -> bool: ...
    def open_echo(self, flow_id: int, destination: str) -> None: ...
    def send_echo(self, flow_id: int, seq: int, payload: bytes) -> bool: ...


@dataclass(frozen=True)
class UdpRelaySettings:
    """Limits of the relay; keep the timeouts equal to the agent's so both ends expire flows alike."""

    idle_timeout: float = 60.0
    dns_idle_timeout: float = 10.0
    max_flows: int = 1024


@dataclass(frozen=True)
class DnsOverride:
    """Send datagrams for `tunnel_addresses` to `upstream` instead.

    `tunnel_addresses`: the DNS addresses the client's resolver is pointed at, e.g.
    ``("100.100.83.53", 53)`` and ``("fd78:7832:7373::53", 53)``. `upstream`: `SERVER_RESOLVER` (the
    server's own resolver, `--vpn-dns remote`) or an explicit ``(address, port)`` (`--vpn-dns ADDR`).
    """

    tunnel_addresses: tuple[Address, ...]
    upstream: Address = SERVER_RESOLVER

    def __post_init__(self) -> None:
        # Canonical address text, so lookups match what the netstack reports.
        canonical = tuple((str(ipaddress.ip_address(host)), port) for host, port in self.tunnel_addresses)
        object.__setattr__(self, "tunnel_addresses", canonical)


@dataclass
class UdpRelayStats:
    """Counters; `drops` maps a reason to a count."""

    flows_opened: int = 0
    flows_expired: int = 0
    flows_closed_by_agent: int = 0
    dns_answered: int = 0
    echo_requests: int = 0
    echo_replies: int = 0
    unreachable_to_app: int = 0
    datagrams_to_agent: int = 0
    bytes_to_agent: int = 0
    datagrams_to_app: int = 0
    bytes_to_app: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)


class _Flow:
    __slots__ = (
        "app",
        "destination",
        "dns",
        "echo",
        "flow_id",
        "key",
        "last_active",
        "last_seq",
        "queries",
        "reply_source",
    )

    def __init__(self, flow_id: int, key: tuple, destination: Address, dns: bool, echo: bool = False) -> None:
        self.flow_id = flow_id
        self.key = key  # (app, destination as the app sent it), or (app host, target, identifier) for echo
        self.app = key[0]
        self.destination = destination  # what the agent sends to (the real resolver for DNS overrides)
        self.reply_source: Address | None = None  # fixed source for replies (the tunnel DNS address)
        self.dns = dns
        self.echo = echo
        self.queries: set[bytes] | None = set() if dns else None  # DNS query ids not answered yet
        self.last_seq = 0  # echo flows: the latest request's sequence number
        self.last_active = 0.0


def ping_refusal_reason(server_platform: str) -> str:
    """Why the agent on a server whose `sys.platform` is `server_platform` refused to ping, for the user."""
    if server_platform == "win32":
        why = "the agent on a Windows server cannot ping (Windows has no unprivileged ping sockets)"
    elif server_platform.startswith("linux"):
        why = (
            "the server may not open ping sockets (its net.ipv4.ping_group_range excludes the SSH user's "
            "groups)"
        )
    else:
        why = (
            f"the server ({server_platform or 'its OS unknown'}) does not let the SSH user open ping sockets"
        )
    return why + "; pings get 'administratively prohibited'"


class UdpRelay:
    """Relays the apps' UDP datagrams through an agent link; see the module docstring."""

    def __init__(
        self,
        send_to_app: SendToApp,
        settings: UdpRelaySettings | None = None,
        dns_override: DnsOverride | None = None,
        clock: Callable[[], float] = time.monotonic,
        icmp: IcmpToApp | None = None,
    ) -> None:
        self._send_to_app = send_to_app
        self._icmp = icmp
        self.ping_refused: str | None = None  # why pings get "administratively prohibited", once known
        self.settings = settings or UdpRelaySettings()
        self.dns_override = dns_override
        self._tunnel_dns = frozenset(dns_override.tunnel_addresses) if dns_override else frozenset()
        self._clock = clock
        self.stats = UdpRelayStats()
        self._agent: AgentLink | None = None
        self._by_key: dict[tuple, _Flow] = {}
        self._by_id: dict[int, _Flow] = {}
        self._recency: dict[bool, collections.OrderedDict[_Flow, None]] = {
            True: collections.OrderedDict(),
            False: collections.OrderedDict(),
        }
        self._next_id = 1

    # --- agent link -----------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._agent is not None

    @property
    def flow_count(self) -> int:
        return len(self._by_id)

    def attach(self, agent: AgentLink, resumed: bool = False) -> None:
        """Use `agent` from now on. `resumed`: it is the same agent re-attached, whose sockets still carry
        the flows; otherwise the flows of a previous agent are forgotten."""
        if self._agent is not None:
            self.detach()
        if not resumed:
            self._forget_all()
            self.ping_refused = None
        self._agent = agent
        agent.set_receiver(self)

    def detach(self) -> None:
        """Forget the agent; its flows stay known (expiring as usual) in case it is re-attached."""
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.set_receiver(None)

    def refuse_pings(self, reason: str) -> None:
        """Answer every echo request with "administratively prohibited" (e.g. no agent can run)."""
        if self.ping_refused is None:
            log.warning("ping through the tunnel is not possible: %s", reason)
        self.ping_refused = reason

    def _forget_all(self) -> None:
        self._by_key.clear()
        self._by_id.clear()
        for recency in self._recency.values():
            recency.clear()

    def agent_lost(self, reason: str) -> None:
        """Called by the agent link when its connection ends."""
        log.warning("UDP agent lost: %s; UDP datagrams are dropped until it is back", reason)
        self.detach()

    # --- app -> agent ---------------------------------------------------------------------------------

    def datagram_from_app(self, src: Address, dst: Address, payload: bytes) -> None:
        """A datagram an app sent from `src` to `dst` (as seen by the netstack)."""
        agent = self._agent
        stats = self.stats
        if agent is None:
            stats.drops["no_agent"] += 1
            return
        if len(payload) > MAX_PAYLOAD:
            stats.drops["oversized"] += 1
            return
        key = (src, dst)
        flow = self._by_key.get(key)
        now = self._clock()
        if flow is None:
            flow = self._open(agent, key)
            if flow is None:
                return
            flow.last_active = now
        elif now - flow.last_active >= RECENCY_STEP:
            flow.last_active = now
            self._recency[flow.dns].move_to_end(flow)
        if flow.queries is not None and len(payload) >= 2 and len(flow.queries) < MAX_DNS_QUERIES:
            flow.queries.add(payload[:2])
        if agent.send_datagram(flow.flow_id, payload):
            stats.datagrams_to_agent += 1
            stats.bytes_to_agent += len(payload)
        else:
            stats.drops["agent_backpressure"] += 1

    def echo_from_app(self, app: str, target: str, ident: int, seq: int, payload: bytes) -> None:
        """An ICMP echo request an app sent from `app` to `target` (identifier, sequence number, data)."""
        stats = self.stats
        stats.echo_requests += 1
        agent = self._agent
        if self.ping_refused is not None or (agent is not None and not agent.supports_icmp):
            self._prohibited(app, target, ident, seq)
            return
        if agent is None:
            stats.drops["no_agent"] += 1
            return
        key = (app, target, ident)
        flow = self._by_key.get(key)
        if flow is None:
            if len(self._by_id) >= self.settings.max_flows:
                stats.drops["flow_limit"] += 1
                return
            flow = _Flow(self._allocate_id(), key, (target, 0), False, echo=True)
            self._add(flow)
            agent.open_echo(flow.flow_id, target)
        else:
            self._recency[False].move_to_end(flow)
        flow.last_active = self._clock()
        flow.last_seq = seq
        if not agent.send_echo(flow.flow_id, seq, payload):
            stats.drops["agent_backpressure"] += 1

    def _prohibited(self, app: str, target: str, ident: int, seq: int) -> None:
        if self._icmp is not None:
            self.stats.unreachable_to_app += 1
            self._icmp.unreachable(target, (app, ident), (target, seq), p.UNREACH_PROHIBITED, True)

    def _add(self, flow: _Flow) -> None:
        self._by_key[flow.key] = flow
        self._by_id[flow.flow_id] = flow
        self._recency[flow.dns][flow] = None
        self.stats.flows_opened += 1

    def _open(self, agent: AgentLink, key: tuple[Address, Address]) -> _Flow | None:
        if len(self._by_id) >= self.settings.max_flows:
            self.stats.drops["flow_limit"] += 1
            return None
        dst = key[1]
        reply_source = None
        destination = dst
        if dst in self._tunnel_dns:
            assert self.dns_override is not None
            destination = self.dns_override.upstream
            reply_source = dst
        dns = destination == SERVER_RESOLVER or destination[1] == 53
        flow = _Flow(self._allocate_id(), key, destination, dns)
        flow.reply_source = reply_source
        self._add(flow)
        agent.open_flow(flow.flow_id, destination)
        return flow

    def _allocate_id(self) -> int:
        # Ids grow monotonically so a reply to a just-closed flow never lands on a new one;
        # after 2**32 - 1 flows they wrap, skipping ids still in use.
        while True:
            flow_id = self._next_id
            self._next_id = flow_id + 1 if flow_id < 0xFFFFFFFF else 1
            if flow_id not in self._by_id:
                return flow_id

    # --- agent -> app ---------------------------------------------------------------------------------

    def datagram_from_agent(self, flow_id: int, source: Address, payload: bytes) -> None:
        """A reply the agent received for `flow_id` from `source`."""
        flow = self._by_id.get(flow_id)
        if flow is None or flow.echo:
            self.stats.drops["unknown_flow"] += 1
            return
        if flow.destination != SERVER_RESOLVER and source != flow.destination:
            # The agent's socket is connected to the destination, so this cannot be its answer.
            self.stats.drops["wrong_source"] += 1
            return
        self.stats.datagrams_to_app += 1
        self.stats.bytes_to_app += len(payload)
        self._send_to_app(flow.reply_source or source, flow.app, payload)
        queries = flow.queries
        if queries is not None:
            queries.discard(payload[:2])
            if not queries:
                # Every query of this DNS flow is answered: end it now rather than after an idle wait.
                self.stats.dns_answered += 1
                self._forget(flow)
                if self._agent is not None:
                    self._agent.close_flow(flow_id)
                return
        now = self._clock()
        if now - flow.last_active >= RECENCY_STEP:
            flow.last_active = now
            self._recency[flow.dns].move_to_end(flow)

    def echo_from_agent(self, flow_id: int, seq: int, payload: bytes) -> None:
        """The real echo reply the agent's ping socket received."""
        flow = self._by_id.get(flow_id)
        if flow is None or not flow.echo:
            self.stats.drops["unknown_flow"] += 1
            return
        flow.last_active = self._clock()
        self._recency[False].move_to_end(flow)
        self.stats.echo_replies += 1
        if self._icmp is not None:
            app, target, ident = flow.key
            self._icmp.echo_reply(target, app, ident, seq, payload)

    def unreachable_from_agent(self, flow_id: int, code: int, info: int, reporter: str | None) -> None:
        """The flow's destination is unreachable: the app gets the matching ICMP error."""
        flow = self._by_id.get(flow_id)
        if flow is None:
            self.stats.drops["unknown_flow"] += 1
            return
        if self._icmp is None:
            return
        self.stats.unreachable_to_app += 1
        if flow.echo:
            app, target, ident = flow.key
            self._icmp.unreachable(reporter or target, (app, ident), (target, info), code, True)
            return
        dst = flow.key[1]
        # The app asked the tunnel DNS address (or the destination): the error comes from there.
        source = dst[0] if flow.reply_source is not None or reporter is None else reporter
        self._icmp.unreachable(source, flow.app, dst, code, False)

    def flow_closed_by_agent(self, flow_id: int, reason: int) -> None:
        """The agent closed a flow (idle, limit, socket error): forget it; the next datagram reopens."""
        flow = self._by_id.get(flow_id)
        if flow is None:
            return
        log.debug(
            "agent closed UDP flow %d (%s -> %s), reason %d", flow_id, flow.app, flow.destination, reason
        )
        self.stats.flows_closed_by_agent += 1
        self._forget(flow)
        if flow.echo and reason == p.CLOSE_NOT_PERMITTED:
            self.refuse_pings(ping_refusal_reason(self._agent.python.platform if self._agent else ""))
            app, target, ident = flow.key
            self._prohibited(app, target, ident, flow.last_seq)

    # --- time -----------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `expire()` next has work to do (clock units), or None without flows."""
        deadlines = [
            next(iter(self._recency[dns])).last_active + self._timeout(dns)
            for dns in (True, False)
            if self._recency[dns]
        ]
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> int:
        """Close flows idle since their timeout; return how many."""
        expired = 0
        for dns in (True, False):
            recency = self._recency[dns]
            timeout = self._timeout(dns)
            while recency:
                flow = next(iter(recency))
                if flow.last_active + timeout > now:
                    break
                self._forget(flow)
                expired += 1
                if self._agent is not None:
                    self._agent.close_flow(flow.flow_id)
        self.stats.flows_expired += expired
        return expired

    def close_all(self) -> None:
        """Close every flow on the agent (e.g. before a clean shutdown)."""
        for flow in list(self._by_id.values()):
            self._forget(flow)
            if self._agent is not None:
                self._agent.close_flow(flow.flow_id)

    def flows(self) -> Iterable[tuple[int, object, Address]]:
        """(flow id, app address, destination) of every open flow, for status views."""
        return [(f.flow_id, f.app, f.destination) for f in self._by_id.values()]

    def _timeout(self, dns: bool) -> float:
        return self.settings.dns_idle_timeout if dns else self.settings.idle_timeout

    def _forget(self, flow: _Flow) -> None:
        self._by_key.pop(flow.key, None)
        self._by_id.pop(flow.flow_id, None)
        self._recency[flow.dns].pop(flow, None)
