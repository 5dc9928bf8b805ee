"""Routes for the VPN: a pure planner and a Linux (netlink) applier.

The plan never replaces the user's default route. It pins the SSH server (and every ProxyJump hop) and each
`--vpn-exclude` CIDR to the path they use now, then catches everything else with two half-space routes per
family through the TUN (0.0.0.0/1 + 128.0.0.0/1, ::/1 + 8000::/1): being more specific than any default
route they win without deleting it, and removing them restores the old state exactly. More specific routes
the user already has (e.g. the LAN's own subnet) keep winning, as with any split-route VPN.

Our routes carry the protocol number X2SSH_RT_PROTO, and deletes always ask for that protocol, so the kernel
itself refuses to delete a route of the user's that happens to look like ours.

pyroute2 0.9's synchronous IPRoute runs its own event loop: from asyncio code, call these functions through
`asyncio.to_thread(...)`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from x2ssh.errors import RoutingError
from x2ssh.settings import IPAddress, IPNetwork

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

log = logging.getLogger(__name__)

X2SSH_RT_PROTO = 0x58  # 88, unassigned in /etc/iproute2/rt_protos; shows as "proto 88" in `ip route`
ROUTE_RECORD = "route"
MAIN_TABLE = 254
_RTN_UNICAST = 1
_RT_SCOPE_LINK = 253
_RT_SCOPE_NOWHERE = 255  # in a delete: match routes of any scope (else only scope "global" matches)
_GONE = (errno.ESRCH, errno.ENOENT, errno.ENODEV)

TUNNEL_SPLITS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1")
)


@dataclass(frozen=True)
class OriginalPath:
    """How the kernel reaches an address before the VPN is up (from `route get`)."""

    gateway: IPAddress | None
    dev: str
    src: IPAddress | None = None


@dataclass(frozen=True)
class PlannedRoute:
    """One route to add: `dst` via `gateway` (None: on-link) out of `dev`; `reason` is for humans."""

    dst: IPNetwork
    dev: str
    gateway: IPAddress | None = None
    reason: str = ""


@dataclass(frozen=True)
class RoutePlan:
    """The routes to add, in order (pinned paths first, tunnel catch-alls last), and what was skipped."""

    routes: tuple[PlannedRoute, ...]
    skipped: tuple[str, ...] = field(default=())


def plan_routes(
    tun: str,
    server_addrs: Sequence[IPAddress],
    excludes: Sequence[IPNetwork],
    original: Callable[[IPAddress | IPNetwork], OriginalPath | None],
) -> RoutePlan:
    """Plan the VPN's routes. Pure: `original` answers how each address/network is reached now.

    A target without an original path (e.g. no IPv6 default route) is skipped; its family still goes to the
    TUN. A target whose original path already is the TUN is an error (it would loop).
    """
    routes: list[PlannedRoute] = []
    skipped: list[str] = []
    taken: set[IPNetwork] = set()

    def pin(target: IPAddress | IPNetwork, dst: IPNetwork, reason: str) -> None:
        if dst in taken:
            return
        path = original(target)
        if path is None:
            skipped.append(f"{reason} {dst}: no route to it now, not pinned")
            return
        if path.dev == tun:
            raise RoutingError(f"the route to {target} already goes through {tun}: it would loop")
        taken.add(dst)
        routes.append(PlannedRoute(dst, path.dev, path.gateway, reason))

    for addr in server_addrs:
        pin(addr, ipaddress.ip_network(addr), "server")
    for net in excludes:
        pin(net, net, "exclude")
    for split in TUNNEL_SPLITS:
        if split not in taken:
            taken.add(split)
            routes.append(PlannedRoute(split, tun, None, "tunnel"))
    return RoutePlan(tuple(routes), tuple(skipped))


class LinuxRouting:
    """Reads and changes the routes of the current network namespace through netlink (pyroute2)."""

    def __init__(self) -> None:
        self._added: list[PlannedRoute] = []

    def lookup_original(self, target: IPAddress | IPNetwork) -> OriginalPath | None:
        """The path the kernel uses now for `target` (a network: its first address); None if unrouted."""
        addr = target.network_address if isinstance(target, IPv4Network | IPv6Network) else target
        with iproute() as ipr:
            try:
                msg = ipr.route("get", dst=str(addr), family=_family(addr))[0]
            except NetlinkError as e:
                if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
                    return None
                raise RoutingError(f"cannot look up the route to {addr}: {e}") from e
            if msg["type"] != _RTN_UNICAST:  # local, blackhole, unreachable, ...
                return None
            oif = msg.get_attr("RTA_OIF")
            links = ipr.get_links(oif) if oif else []
            if not links:
                return None
            gateway = msg.get_attr("RTA_GATEWAY")
            src = msg.get_attr("RTA_PREFSRC")
            return OriginalPath(
                gateway=ipaddress.ip_address(gateway) if gateway else None,
                dev=links[0].get_attr("IFLA_IFNAME"),
                src=ipaddress.ip_address(src) if src else None,
            )

    def apply(self, plan: RoutePlan, journal: StateJournal) -> None:
        """Add the plan's routes in order, each recorded in `journal` before it is added.

        A route that already exists identically is left alone and marked "not ours" in the journal.
        Raises RoutingError on any other failure (what was added so far stays recorded for undo).
        """
        for note in plan.skipped:
            log.info("routing: %s", note)
        with iproute() as ipr:
            for route in plan.routes:
                indexes = ipr.link_lookup(ifname=route.dev)
                if not indexes:
                    raise RoutingError(f"cannot route {route.dst}: no interface {route.dev}")
                seq = journal.record(ROUTE_RECORD, **_route_record(route))
                try:
                    ipr.route("add", oif=indexes[0], **_route_key(route))
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        journal.forget(seq)
                        log.warning("route %s exists already; leaving it as it is", _describe(route))
                        continue
                    raise RoutingError(f"cannot add route {_describe(route)}: {e}") from e
                self._added.append(route)
                log.debug("added route %s", _describe(route))

    def undo(self, plan: RoutePlan) -> None:
        """Remove, in reverse order, the routes of `plan` that this object added (never anyone else's)."""
        ours = [r for r in plan.routes if r in self._added]
        with iproute() as ipr:
            for route in reversed(ours):
                _delete(ipr, route.dst, route.gateway)
                self._added.remove(route)


def undo_route_record(data: dict[str, Any]) -> str:
    """Undo one journal route record: delete our route (matched by protocol) if it is still there."""
    dst = ipaddress.ip_network(data["dst"])
    gateway = ipaddress.ip_address(data["gateway"]) if data.get("gateway") else None
    with iproute() as ipr:
        removed = _delete(ipr, dst, gateway)
    where = f"via {gateway} " if gateway else ""
    return f"{'removed' if removed else 'already gone:'} route {dst} {where}dev {data.get('dev')}"


def _delete(ipr: IPRoute, dst: IPNetwork, gateway: IPAddress | None) -> bool:
    key: dict[str, Any] = {
        "dst": str(dst),
        "family": _family(dst),
        "proto": X2SSH_RT_PROTO,
        "table": MAIN_TABLE,
    }
    if gateway is not None:
        key["gateway"] = str(gateway)
    if dst.version == 4:
        key["scope"] = _RT_SCOPE_NOWHERE
    try:
        ipr.route("del", **key)
    except NetlinkError as e:
        if e.code in _GONE:
            return False
        raise RoutingError(f"cannot remove route {dst}: {e}") from e
    return True


def _route_key(route: PlannedRoute) -> dict[str, Any]:
    key: dict[str, Any] = {
        "dst": str(route.dst),
        "family": _family(route.dst),
        "proto": X2SSH_RT_PROTO,
        "table": MAIN_TABLE,
    }
    if route.gateway is not None:
        key["gateway"] = str(route.gateway)
    elif route.dst.version == 4:
        key["scope"] = _RT_SCOPE_LINK  # what `ip route add ... dev X` does for an on-link route
    return key


def _route_record(route: PlannedRoute) -> dict[str, Any]:
    return {
        "dst": str(route.dst),
        "gateway": str(route.gateway) if route.gateway else None,
        "dev": route.dev,
        "reason": route.reason,
        "proto": X2SSH_RT_PROTO,
    }


def _describe(route: PlannedRoute) -> str:
    via = f" via {route.gateway}" if route.gateway else ""
    return f"{route.dst}{via} dev {route.dev}"


def _family(target: IPAddress | IPNetwork) -> int:
    return socket.AF_INET6 if target.version == 6 else socket.AF_INET


def iproute() -> IPRoute:
    """A synchronous pyroute2 IPRoute for the current namespace; refuses to run inside an asyncio loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return IPRoute()
    raise RuntimeError("pyroute2's IPRoute cannot run inside an asyncio loop: call via asyncio.to_thread()")
