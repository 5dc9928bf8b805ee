"""Routes for the VPN: pure planners and a Linux (netlink) applier.

Policy routing (`plan_policy` + `LinuxRouting.apply_policy`, the default where the kernel has fib rules),
as wg-quick does it. The SSH connection's sockets (the server, a ProxyJump first hop, the UDP sockets that
resolve the server's name) carry the firewall mark FWMARK, set with SO_MARK by x2ssh's privileged helper.
Per family, three kinds of rules in front of the kernel's own `lookup main` (priority 32766):

    PRIORITY_EXCLUDE   to <each --vpn-exclude CIDR> lookup main        excluded networks keep their path
    PRIORITY_SUPPRESS  lookup main suppress_prefixlength 0             main's specific routes keep winning
    PRIORITY_TUNNEL    not fwmark FWMARK lookup TUNNEL_TABLE           everything else: the TUN

and TUNNEL_TABLE holds one default route through the TUN. `suppress_prefixlength 0` ignores an answer from
main that is a default route (prefix length 0), so the LAN's subnet, the TUN's own subnet and the user's
other specific routes still win, but main's default does not. Marked traffic never matches the last rule
and falls through to `lookup main`: it follows main's default route wherever it points now, through link
and uplink changes, with no host route that could go stale. net.ipv4.conf.all.src_valid_mark=1 lets a
packet's mark count in reverse-path (rp_filter) lookups, as wg-quick sets it.

The split-route mode (`plan_routes` + `LinuxRouting.apply`) is the fallback where policy routing is
unavailable. It never replaces the user's default route. It pins the SSH server (and every ProxyJump hop)
and each `--vpn-exclude` CIDR to the path they use now, then catches everything else with two half-space
routes per family through the TUN (0.0.0.0/1 + 128.0.0.0/1, ::/1 + 8000::/1): being more specific than any
default route they win without deleting it, and removing them restores the old state exactly. More specific
routes the user already has (e.g. the LAN's own subnet) keep winning, as with any split-route VPN.

Our routes and rules carry the protocol number X2SSH_RT_PROTO, and deletes always ask for that protocol
(and for our table and priority), so the kernel itself refuses to delete a route or rule of the user's that
happens to look like ours. Every change is journaled before it is made; the journal's undo functions
(`undo_route_record`, `undo_rule_record`, `undo_sysctl_record`) tolerate a change that is already gone.

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
from pathlib import Path
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
RULE_RECORD = "rule"
SYSCTL_RECORD = "sysctl"
MAIN_TABLE = 254

FWMARK = 0x7832
"""The firewall mark ("x2" in ASCII) on the SSH connection's sockets (SO_MARK): such traffic skips the tunnel
and follows the main table. Only root can set SO_MARK; x2ssh's privileged helper hands out the sockets."""
TUNNEL_TABLE = 0x7832
"""The routing table (30770) that holds the default route through the TUN for unmarked traffic."""
PRIORITY_EXCLUDE = 6830
"""`to <exclude> lookup main`: first, so excluded networks keep main's path even via its default route."""
PRIORITY_SUPPRESS = 6831
"""`lookup main suppress_prefixlength 0`: main's specific routes (LAN, the TUN's own subnet) keep winning."""
PRIORITY_TUNNEL = 6832
"""`not fwmark FWMARK lookup TUNNEL_TABLE`: everything unmarked that is left goes through the TUN."""
PRIORITIES = range(6830, 6840)
"""x2ssh's own rule priorities: before the kernel's `lookup main` (32766) and the automatic priorities of
`ip rule add` (counting down from 32765, as wg-quick's rules get), clear of Tailscale's 5210-5270."""
SRC_VALID_MARK = "net.ipv4.conf.all.src_valid_mark"
_SYSCTLS = {SRC_VALID_MARK: "/proc/sys/net/ipv4/conf/all/src_valid_mark"}  # the only ones we ever write
_OUR_TABLES = (MAIN_TABLE, TUNNEL_TABLE)  # journal records naming any other table are refused
_FIB_RULE_INVERT = 0x2  # fib_rule_hdr flag: `not` in `ip rule`
_RTN_UNICAST = 1
_RT_SCOPE_LINK = 253
_RT_SCOPE_NOWHERE = 255  # in a delete: match routes of any scope (else only scope "global" matches)
_GONE = (errno.ESRCH, errno.ENOENT, errno.ENODEV)
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}

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
    """One route to add: `dst` via `gateway` (None: on-link) out of `dev` in `table`; `reason` is for
    humans."""

    dst: IPNetwork
    dev: str
    gateway: IPAddress | None = None
    reason: str = ""
    table: int = MAIN_TABLE


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


@dataclass(frozen=True)
class PolicyRule:
    """One `ip rule` to add (family 4 or 6): at `priority`, look up `table` for traffic that matches.

    Matches: to `dst` if set; marked `fwmark` if set (not marked with it, if `invert`). With
    `suppress_prefixlength` set, an answer from `table` whose prefix is that long or shorter is ignored.
    """

    family: int
    priority: int
    table: int
    dst: IPNetwork | None = None
    fwmark: int | None = None
    invert: bool = False
    suppress_prefixlength: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class SysctlSetting:
    """A sysctl to set (by its dotted name) for as long as the VPN runs."""

    name: str
    value: str


@dataclass(frozen=True)
class PolicyPlan:
    """What policy routing changes, in the order to apply it: sysctls, TUNNEL_TABLE routes, then rules
    (per family, the rule that sends traffic into the tunnel comes last, once what it relies on is there)."""

    sysctls: tuple[SysctlSetting, ...]
    routes: tuple[PlannedRoute, ...]
    rules: tuple[PolicyRule, ...]


def plan_policy(tun: str, excludes: Sequence[IPNetwork], families: Sequence[int] = (4, 6)) -> PolicyPlan:
    """Plan policy routing through `tun` for the IP `families` (4 and/or 6). Pure.

    Excludes of a family not in `families` are dropped (that family does not go through the tunnel, so they
    keep their path anyway); duplicates are planned once.
    """
    unknown = [f for f in families if f not in (4, 6)]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty choice of 4 and 6, not {tuple(families)!r}")
    nets = list(dict.fromkeys(ipaddress.ip_network(n) for n in excludes))
    sysctls: list[SysctlSetting] = []
    routes: list[PlannedRoute] = []
    rules: list[PolicyRule] = []
    for family in sorted(set(families)):
        default = ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0")
        routes.append(PlannedRoute(default, tun, None, "tunnel", TUNNEL_TABLE))
        rules += [
            PolicyRule(family, PRIORITY_EXCLUDE, MAIN_TABLE, dst=net, reason="exclude")
            for net in nets
            if net.version == family
        ]
        rules += [
            PolicyRule(family, PRIORITY_SUPPRESS, MAIN_TABLE, suppress_prefixlength=0, reason="specific"),
            PolicyRule(family, PRIORITY_TUNNEL, TUNNEL_TABLE, fwmark=FWMARK, invert=True, reason="tunnel"),
        ]
    if 4 in families:
        sysctls.append(SysctlSetting(SRC_VALID_MARK, "1"))
    return PolicyPlan(tuple(sysctls), tuple(routes), tuple(rules))


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
                self._add_route(ipr, route, journal)

    def policy_families(self, tun: str | None = None) -> tuple[int, ...]:
        """The IP families (4, 6) in which policy routing can work here: the kernel answers for its fib
        rules, and for 6, IPv6 is enabled (on `tun` if given and it exists, else on `all`)."""
        found: list[int] = []
        with iproute() as ipr:
            for family in (4, 6):
                try:
                    list(ipr.get_rules(family=_AF[family]))
                except NetlinkError as e:
                    log.info("no IPv%d policy routing here: %s", family, e)
                    continue
                if family == 6 and not _ipv6_enabled(tun):
                    continue
                found.append(family)
        return tuple(found)

    def policy_supported(self) -> bool:
        """True if this kernel has IPv4 policy routing (fib rules); else use the split-route mode."""
        return 4 in self.policy_families()

    def apply_policy(self, plan: PolicyPlan, journal: StateJournal) -> None:
        """Make the plan's sysctl changes, TUNNEL_TABLE routes and rules, in order, each recorded in
        `journal` before it is made. The TUN must exist and be up (the kernel refuses routes through a
        device that is down).

        A route or rule that already exists identically is left alone and marked "not ours" in the journal;
        a sysctl that already has the value is not touched. Raises RoutingError on any other failure (what
        was done so far stays recorded: undo it with the journal).
        """
        for setting in plan.sysctls:
            _set_sysctl(setting, journal)
        with iproute() as ipr:
            for route in plan.routes:
                self._add_route(ipr, route, journal)
            for rule in plan.rules:
                seq = journal.record(RULE_RECORD, **_rule_record(rule))
                try:
                    ipr.rule("add", **_rule_key(rule))
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        journal.forget(seq)
                        log.warning("rule %s exists already; leaving it as it is", _describe_rule(rule))
                        continue
                    raise RoutingError(f"cannot add rule {_describe_rule(rule)}: {e}") from e
                log.debug("added rule %s", _describe_rule(rule))
        log.info(
            "policy routing on: unmarked traffic goes to %s (table %d), marked 0x%x follows the main table",
            plan.routes[0].dev if plan.routes else "?",
            TUNNEL_TABLE,
            FWMARK,
        )

    def _add_route(self, ipr: IPRoute, route: PlannedRoute, journal: StateJournal) -> None:
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
                return
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
    """Undo one journal route record: delete our route (matched by protocol and table) if it is still
    there. Records without a table (older journals) mean the main table."""
    dst = ipaddress.ip_network(data["dst"])
    gateway = ipaddress.ip_address(data["gateway"]) if data.get("gateway") else None
    table = _our_table(data.get("table", MAIN_TABLE))
    with iproute() as ipr:
        removed = _delete(ipr, dst, gateway, table)
    where = f"via {gateway} " if gateway else ""
    in_table = f" table {table}" if table != MAIN_TABLE else ""
    return f"{'removed' if removed else 'already gone:'} route {dst} {where}dev {data.get('dev')}{in_table}"


def undo_rule_record(data: dict[str, Any]) -> str:
    """Undo one journal rule record: delete our rule (matched by priority, table, protocol and the rest of
    its selector) if it is still there. Refuses records that do not describe one of x2ssh's rules."""
    try:
        rule = PolicyRule(
            family=int(data["family"]),
            priority=int(data["priority"]),
            table=int(data["table"]),
            dst=ipaddress.ip_network(data["dst"]) if data.get("dst") else None,
            fwmark=int(data["fwmark"]) if data.get("fwmark") is not None else None,
            invert=bool(data.get("invert", False)),
            suppress_prefixlength=(
                int(data["suppress_prefixlength"]) if data.get("suppress_prefixlength") is not None else None
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RoutingError(f"unreadable rule record {data!r}: {e}") from e
    if rule.family not in _AF or rule.priority not in PRIORITIES or rule.table not in _OUR_TABLES:
        # never delete a rule on the word of a journal line that does not look like ours
        raise RoutingError(f"journal names a rule that is not x2ssh's: {data!r}")
    with iproute() as ipr:
        try:
            ipr.rule("del", **_rule_key(rule))
            removed = True
        except NetlinkError as e:
            if e.code not in _GONE:
                raise RoutingError(f"cannot remove rule {_describe_rule(rule)}: {e}") from e
            removed = False
    return f"{'removed' if removed else 'already gone:'} rule {_describe_rule(rule)}"


def undo_sysctl_record(data: dict[str, Any]) -> str:
    """Undo one journal sysctl record: write back the value it had before. Only sysctls x2ssh sets."""
    name, old = str(data.get("name")), str(data.get("old"))
    path = _SYSCTLS.get(name)
    if path is None or not old.lstrip("-").isdigit():
        raise RoutingError(f"journal names a sysctl change that is not x2ssh's: {data!r}")
    try:
        now = Path(path).read_text().strip()
        if now == old:
            return f"already restored: {name} = {old}"
        Path(path).write_text(old + "\n")
    except OSError as e:
        raise RoutingError(f"cannot restore {name} to {old}: {e.strerror}") from e
    return f"restored {name} = {old} (was {now})"


def _set_sysctl(setting: SysctlSetting, journal: StateJournal) -> None:
    path = _SYSCTLS.get(setting.name)
    if path is None:
        raise RoutingError(f"x2ssh does not set sysctl {setting.name}")
    try:
        old = Path(path).read_text().strip()
        if old == setting.value:
            log.debug("%s is %s already", setting.name, old)
            return
        journal.record(SYSCTL_RECORD, name=setting.name, old=old, value=setting.value)
        Path(path).write_text(setting.value + "\n")
    except OSError as e:
        raise RoutingError(f"cannot set {setting.name} = {setting.value}: {e.strerror}") from e
    log.debug("%s: %s -> %s", setting.name, old, setting.value)


def _ipv6_enabled(dev: str | None) -> bool:
    conf = Path("/proc/sys/net/ipv6/conf")
    path = conf / dev / "disable_ipv6" if dev and (conf / dev).is_dir() else conf / "all" / "disable_ipv6"
    try:
        return path.read_text().strip() == "0"
    except OSError:
        return False  # no IPv6 in this kernel


def _our_table(table: Any) -> int:
    if not isinstance(table, int) or table not in _OUR_TABLES:
        raise RoutingError(f"journal names a routing table that is not x2ssh's: {table!r}")
    return table


def _rule_key(rule: PolicyRule) -> dict[str, Any]:
    key: dict[str, Any] = {
        "family": _AF[rule.family],
        "priority": rule.priority,
        "table": rule.table,
        "protocol": X2SSH_RT_PROTO,  # deletes match it: the kernel never removes a rule of the user's
    }
    if rule.dst is not None:
        key["dst"] = str(rule.dst.network_address)
        key["dst_len"] = rule.dst.prefixlen
    if rule.fwmark is not None:
        key["fwmark"] = rule.fwmark
        key["fwmask"] = 0xFFFFFFFF
    if rule.invert:
        key["flags"] = _FIB_RULE_INVERT
    if rule.suppress_prefixlength is not None:
        key["suppress_prefixlen"] = rule.suppress_prefixlength
    return key


def _rule_record(rule: PolicyRule) -> dict[str, Any]:
    return {
        "family": rule.family,
        "priority": rule.priority,
        "table": rule.table,
        "dst": str(rule.dst) if rule.dst is not None else None,
        "fwmark": rule.fwmark,
        "invert": rule.invert,
        "suppress_prefixlength": rule.suppress_prefixlength,
        "reason": rule.reason,
        "proto": X2SSH_RT_PROTO,
    }


def _describe_rule(rule: PolicyRule) -> str:
    parts = [f"-{rule.family} {rule.priority}:"]
    if rule.invert:
        parts.append("not")
    if rule.fwmark is not None:
        parts.append(f"fwmark 0x{rule.fwmark:x}")
    if rule.dst is not None:
        parts.append(f"to {rule.dst}")
    parts.append(f"lookup {'main' if rule.table == MAIN_TABLE else rule.table}")
    if rule.suppress_prefixlength is not None:
        parts.append(f"suppress_prefixlength {rule.suppress_prefixlength}")
    return " ".join(parts)


def _delete(ipr: IPRoute, dst: IPNetwork, gateway: IPAddress | None, table: int = MAIN_TABLE) -> bool:
    key: dict[str, Any] = {
        "dst": str(dst),
        "family": _family(dst),
        "proto": X2SSH_RT_PROTO,
        "table": table,
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
        "table": route.table,
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
        "table": route.table,
    }


def _describe(route: PlannedRoute) -> str:
    via = f" via {route.gateway}" if route.gateway else ""
    table = f" table {route.table}" if route.table != MAIN_TABLE else ""
    return f"{route.dst}{via} dev {route.dev}{table}"


def _family(target: IPAddress | IPNetwork) -> int:
    return socket.AF_INET6 if target.version == 6 else socket.AF_INET


def iproute() -> IPRoute:
    """A synchronous pyroute2 IPRoute for the current namespace; refuses to run inside an asyncio loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return IPRoute()
    raise RuntimeError("pyroute2's IPRoute cannot run inside an asyncio loop: call via asyncio.to_thread()")
