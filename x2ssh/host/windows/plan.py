"""Sans-IO plans for a VPN run on Windows: the run's wishes in, a list of API call records out.

Theory of operation. A plan is a list of small frozen dataclasses, one per Win32 call (named after the
function), each paired with the record that undoes it. `ApplyPlan.undo` is the exact undo list, in reverse
order of the changes. An executor (`iphlpapi.Executor`) carries the records out one by one; tests run them
through a recording fake. Nothing here imports ctypes or touches the machine.

The run is planned in two phases, because one answer must come from the machine first:

1. `lookup_plan(wishes)` asks `GetBestRoute2` for each SSH server endpoint and each `--vpn-exclude`
   network's first address: the path they take *now*, before any route of ours exists.
2. `apply_plan(wishes, best)` turns those answers into the changes. Its first part, `adapter_plan(wishes)`
   (the adapter, its MTU, metric and addresses), needs no answer and no endpoint, so the adapter can exist
   before the SSH connection's endpoints are known.

A run asks for its changes step by step (`HostControl.open_tun`, `routes`, `dns`, `kill_switch`): the host
control plans the whole run with the wishes known so far and carries out the calls it has not made yet
(`host.StagedPlan`). Each step's calls depend only on the wishes of that step and the earlier ones, so an
earlier step's calls are the same in every later plan.

Routing policy (the same as Linux's split-route mode). Windows has no fwmark and no policy rules, so the
SSH connection keeps its path through host routes: /32 (/128) to each server endpoint, and a route for
each exclude, through the interface and next hop that GetBestRoute2 reported. Everything else goes to the
Wintun adapter through two half-space routes per family (0.0.0.0/1 + 128.0.0.0/1, ::/1 + 8000::/1) with a
low metric: being more specific than any default route they win without deleting it. The cost, as with
any pinned host route: after a roam to another uplink the pinned next hop is stale until the run re-plans.

DNS. `SetInterfaceDnsSettings` (Windows 10 2004 and later) puts the session's resolvers on the Wintun
adapter; on older systems the same setting is a `netsh interface ipv4/ipv6 set dnsservers` command (the
fallback plan, chosen by `dns_api=False`). Windows' smart multi-homed name resolution sends queries out of
every interface, so queries are kept in the tunnel by WFP filters (as sing-box's strict_route does), not by
an NRPT rule for ".": the filters live in a dynamic WFP session and vanish when the process dies, while an
NRPT rule is a registry key that survives a crash and must be found and deleted by a later cleanup. The
filters permit port 53 on the Wintun adapter and block remote port 53 everywhere else.

Kill switch. More WFP filters in the same dynamic session: permit the Wintun adapter, loopback, the SSH
connection (remote address + port, and the x2ssh process's app id), the excludes, DHCP and IPv6 neighbour
discovery; block the rest. Closing the engine handle (`FwpmEngineClose0`) removes every filter and the
sublayer at once, which is the whole WFP undo.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Final, Literal, Protocol

from x2ssh.host.api import TUN_V4, TUN_V6

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

AF_INET = 2  # ws2def.h
AF_INET6 = 23  # ws2def.h (not Linux's 10)

TUNNEL_METRIC = 1  # route metric of the half-space routes: below any real uplink's
INTERFACE_METRIC = 1  # the adapter's own metric, so Windows prefers it for DNS and ties
PINNED_METRIC = 0  # host routes for the server keep their path whatever the interface metric

# The Wintun adapter, named symbolically: its LUID is known only once the executor has created it.
TUN: Final = "wintun"
Interface = int | Literal["wintun"]  # an interface LUID (from GetBestRoute2) or the Wintun adapter


# ---- the run's wishes and the machine's answers ---------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One TCP endpoint of the SSH connection (the server, or a ProxyJump first hop); port 0: any port
    (the session gives the host control addresses only)."""

    address: IPAddress
    port: int = 0


@dataclass(frozen=True)
class Wishes:
    """What a VPN run asks of the host, as `HostControl.start/routes/dns/kill_switch` receive it."""

    tun: str
    mtu: int
    ssh_endpoints: Sequence[Endpoint]
    excludes: Sequence[IPNetwork] = ()
    dns_servers: Sequence[IPAddress] = ()
    kill_switch: bool = False
    app_path: str = ""  # the x2ssh process's image (sys.executable): the kill switch's app id
    v4: IPv4Interface = field(default=TUN_V4)  # type: ignore[assignment]
    v6: IPv6Interface | None = field(default=TUN_V6)  # type: ignore[assignment]
    dns_api: bool = True  # SetInterfaceDnsSettings exists (Windows 10 2004+); False: netsh


@dataclass(frozen=True)
class BestRoute:
    """GetBestRoute2's answer for one destination: the interface and next hop it leaves by now."""

    interface: int  # NET_LUID value
    next_hop: IPAddress  # 0.0.0.0 / :: when the destination is on-link


class PlanError(ValueError):
    """The wishes cannot be planned (the caller's fault: bad input), with a message that says why."""


# ---- call records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WintunCreateAdapter:
    name: str
    tunnel_type: str = "x2ssh"


@dataclass(frozen=True)
class WintunCloseAdapter:
    name: str


@dataclass(frozen=True)
class SetIpInterfaceEntry:
    """MTU and metric of the adapter for one family (MIB_IPINTERFACE_ROW.NlMtu / Metric)."""

    interface: Interface
    family: int
    mtu: int
    metric: int


@dataclass(frozen=True)
class CreateUnicastIpAddressEntry:
    interface: Interface
    address: IPv4Interface | IPv6Interface


@dataclass(frozen=True)
class DeleteUnicastIpAddressEntry:
    interface: Interface
    address: IPv4Interface | IPv6Interface


@dataclass(frozen=True)
class GetBestRoute2:
    destination: IPAddress


@dataclass(frozen=True)
class ConvertInterfaceLuidToIndex:
    """A query: the interface index of a LUID (the index is what address-change notifications carry)."""

    interface: Interface


@dataclass(frozen=True)
class CreateIpForwardEntry2:
    interface: Interface
    destination: IPNetwork
    next_hop: IPAddress
    metric: int


@dataclass(frozen=True)
class DeleteIpForwardEntry2:
    interface: Interface
    destination: IPNetwork
    next_hop: IPAddress


@dataclass(frozen=True)
class SetInterfaceDnsSettings:
    """DNS_INTERFACE_SETTINGS with DNS_SETTING_NAMESERVER for one family; no servers clears it."""

    interface: Interface
    family: int
    servers: tuple[IPAddress, ...]


@dataclass(frozen=True)
class Netsh:
    """The fallback for systems without SetInterfaceDnsSettings: one netsh command line (argv)."""

    argv: tuple[str, ...]


@dataclass(frozen=True)
class FwpmEngineOpen:
    """FwpmEngineOpen0 with FWPM_SESSION_FLAG_DYNAMIC: every object added lives as long as the handle."""

    dynamic: bool = True


@dataclass(frozen=True)
class FwpmSubLayerAdd:
    name: str
    weight: int


@dataclass(frozen=True)
class Condition:
    """One FWPM_FILTER_CONDITION0: `field` is the FWPM_CONDITION_* name, `match` the FWP_MATCH_* name."""

    field: str
    match: str
    value: object


@dataclass(frozen=True)
class FwpmFilterAdd:
    name: str
    layer: str  # FWPM_LAYER_* name
    action: Literal["PERMIT", "BLOCK"]
    weight: int  # within our sublayer: higher is evaluated first
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class FwpmEngineClose:
    pass


Call = (
    WintunCreateAdapter
    | WintunCloseAdapter
    | SetIpInterfaceEntry
    | CreateUnicastIpAddressEntry
    | DeleteUnicastIpAddressEntry
    | GetBestRoute2
    | ConvertInterfaceLuidToIndex
    | CreateIpForwardEntry2
    | DeleteIpForwardEntry2
    | SetInterfaceDnsSettings
    | Netsh
    | FwpmEngineOpen
    | FwpmSubLayerAdd
    | FwpmFilterAdd
    | FwpmEngineClose
)


class Executor(Protocol):
    """Carries out one call record (the ctypes executor on Windows, a recording fake in tests)."""

    def call(self, record: Call) -> object: ...


@dataclass
class ApplyPlan:
    """The changes in order, each paired with the call that undoes it (None: goes with an earlier undo)."""

    steps: list[tuple[Call, Call | None]] = field(default_factory=list)

    def add(self, call: Call, undo: Call | None) -> None:
        self.steps.append((call, undo))

    @property
    def apply(self) -> list[Call]:
        return [call for call, _ in self.steps]

    @property
    def undo(self) -> list[Call]:
        """The exact undo list: every change's undo, in reverse order of the changes."""
        return [undo for _, undo in reversed(self.steps) if undo is not None]


def execute(plan: ApplyPlan, executor: Executor) -> list[Call]:
    """Run the plan; if a call fails, undo what was done (newest first) and re-raise.

    Returns the undo list of what was applied, for `undo_all` at the end of the run. An undo that fails
    during the rollback does not hide the first error: it is attached as a note.
    """
    done: list[Call] = []
    for call, undo in plan.steps:
        try:
            executor.call(call)
        except BaseException as exc:
            for failed in undo_all(done, executor):
                exc.add_note(f"undo also failed: {failed}")
            raise
        if undo is not None:
            done.insert(0, undo)
    return done


def undo_all(undo: Sequence[Call], executor: Executor) -> list[str]:
    """Run every undo call, going on past failures (something may already be gone); returns the failures."""
    failures = []
    for call in undo:
        try:
            executor.call(call)
        except Exception as exc:
            failures.append(f"{call}: {exc}")
    return failures


# ---- planning -------------------------------------------------------------------------------------------

HALF_SPACES_V4 = (IPv4Network("0.0.0.0/1"), IPv4Network("128.0.0.0/1"))
HALF_SPACES_V6 = (IPv6Network("::/1"), IPv6Network("8000::/1"))
SUBLAYER_NAME = "x2ssh"
SUBLAYER_WEIGHT = 0xFFFF  # the highest: our permits and blocks are decided before other sublayers' permits

CONNECT = {4: "FWPM_LAYER_ALE_AUTH_CONNECT_V4", 6: "FWPM_LAYER_ALE_AUTH_CONNECT_V6"}
ACCEPT = {4: "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4", 6: "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6"}
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 6, 17, 58
LOOPBACK_FLAG = "FWP_CONDITION_FLAG_IS_LOOPBACK"

# Filter weights inside our sublayer: permits above the DNS block, blocks at the bottom.
W_PERMIT = 15
W_DNS_BLOCK = 10
W_BLOCK_ALL = 0


def _unspecified(address: IPAddress) -> IPAddress:
    return IPv4Address(0) if address.version == 4 else IPv6Address(0)


def _host_network(address: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(address)


def _check_adapter(wishes: Wishes) -> None:
    if not wishes.tun or len(wishes.tun) > 127:
        raise PlanError(f"adapter name must be 1..127 characters (Wintun's limit): {wishes.tun!r}")
    if not 576 <= wishes.mtu <= 65535:
        raise PlanError(f"MTU {wishes.mtu} is outside 576..65535")


def _check(wishes: Wishes) -> None:
    _check_adapter(wishes)
    if not wishes.ssh_endpoints:
        raise PlanError("no SSH server endpoint to keep on its path: the tunnel would carry itself")
    if wishes.kill_switch and not wishes.app_path:
        raise PlanError("the kill switch needs the x2ssh process's path for its app id")


def lookup_plan(wishes: Wishes) -> list[GetBestRoute2]:
    """The GetBestRoute2 queries to run before any change: each endpoint, each exclude's first address."""
    _check(wishes)
    wanted: list[IPAddress] = [e.address for e in wishes.ssh_endpoints]
    wanted += [net.network_address for net in wishes.excludes]
    return [GetBestRoute2(a) for a in dict.fromkeys(wanted)]


def apply_plan(wishes: Wishes, best: dict[IPAddress, BestRoute]) -> ApplyPlan:
    """Every change of the run, in order, with its undo; `best` holds the answers to `lookup_plan`."""
    _check(wishes)
    missing = [q.destination for q in lookup_plan(wishes) if q.destination not in best]
    if missing:
        raise PlanError(f"no original route known for {', '.join(map(str, missing))}")
    plan = adapter_plan(wishes)
    _plan_pinned_routes(plan, wishes, best)
    for net in HALF_SPACES_V4 + (HALF_SPACES_V6 if wishes.v6 is not None else ()):
        hop = _unspecified(net.network_address)
        plan.add(CreateIpForwardEntry2(TUN, net, hop, TUNNEL_METRIC), DeleteIpForwardEntry2(TUN, net, hop))
    _plan_dns(plan, wishes)
    _plan_filters(plan, wishes)
    return plan


def adapter_plan(wishes: Wishes) -> ApplyPlan:
    """The first part of `apply_plan`: the Wintun adapter with its MTU, metric and addresses (no endpoint or
    route answer needed)."""
    _check_adapter(wishes)
    plan = ApplyPlan()
    families = [4] + ([6] if wishes.v6 is not None else [])
    plan.add(WintunCreateAdapter(wishes.tun), WintunCloseAdapter(wishes.tun))
    for fam in families:
        # Nothing to undo: the adapter's settings go with the adapter.
        plan.add(SetIpInterfaceEntry(TUN, _af(fam), wishes.mtu, INTERFACE_METRIC), None)
    addresses: list[IPv4Interface | IPv6Interface] = [wishes.v4]
    if wishes.v6 is not None:
        addresses.append(wishes.v6)
    for addr in addresses:
        plan.add(CreateUnicastIpAddressEntry(TUN, addr), DeleteUnicastIpAddressEntry(TUN, addr))
    return plan


def pinned_route(call: Call) -> CreateIpForwardEntry2 | None:
    """The call if it pins a route through an uplink (the one change that outlives the process: the
    journal's business), else None."""
    if isinstance(call, CreateIpForwardEntry2) and call.interface != TUN:
        return call
    return None


def _af(family: int) -> int:
    return AF_INET if family == 4 else AF_INET6


def _plan_pinned_routes(plan: ApplyPlan, wishes: Wishes, best: dict[IPAddress, BestRoute]) -> None:
    pinned: list[IPNetwork] = [_host_network(e.address) for e in wishes.ssh_endpoints]
    pinned += list(wishes.excludes)
    for net in dict.fromkeys(pinned):
        if wishes.v6 is None and net.version == 6:
            continue  # no IPv6 in the tunnel: IPv6 keeps its path anyway
        route = best[net.network_address]
        plan.add(
            CreateIpForwardEntry2(route.interface, net, route.next_hop, PINNED_METRIC),
            DeleteIpForwardEntry2(route.interface, net, route.next_hop),
        )


def _plan_dns(plan: ApplyPlan, wishes: Wishes) -> None:
    for fam in (4, 6):
        servers = tuple(s for s in wishes.dns_servers if s.version == fam)
        if not servers:
            continue
        if wishes.dns_api:
            plan.add(
                SetInterfaceDnsSettings(TUN, _af(fam), servers),
                SetInterfaceDnsSettings(TUN, _af(fam), ()),
            )
        else:
            ip = "ipv4" if fam == 4 else "ipv6"
            first = ("netsh", "interface", ip, "set", "dnsservers", f"name={wishes.tun}", "source=static")
            plan.add(
                Netsh((*first, f"address={servers[0]}", "register=none", "validate=no")),
                Netsh(("netsh", "interface", ip, "set", "dnsservers", f"name={wishes.tun}", "source=dhcp")),
            )
            for index, server in enumerate(servers[1:], start=2):
                plan.add(
                    Netsh(
                        (
                            *("netsh", "interface", ip, "add", "dnsservers", f"name={wishes.tun}"),
                            *(f"address={server}", f"index={index}", "validate=no"),
                        )
                    ),
                    None,  # removed with the static list above
                )


def _filter(
    name: str, layer: str, action: Literal["PERMIT", "BLOCK"], weight: int, *conds: Condition
) -> FwpmFilterAdd:
    return FwpmFilterAdd(name, layer, action, weight, tuple(conds))


def _plan_filters(plan: ApplyPlan, wishes: Wishes) -> None:
    if not wishes.dns_servers and not wishes.kill_switch:
        return
    plan.add(FwpmEngineOpen(dynamic=True), FwpmEngineClose())
    plan.add(FwpmSubLayerAdd(SUBLAYER_NAME, SUBLAYER_WEIGHT), None)  # goes with the dynamic session
    tun_iface = Condition("FWPM_CONDITION_IP_LOCAL_INTERFACE", "FWP_MATCH_EQUAL", TUN)
    # Both families even when IPv6 stays out of the tunnel: an IPv6 path must not leak DNS or bypass the kill
    # switch just because the tunnel does not carry IPv6.
    for fam in (4, 6):
        connect = CONNECT[fam]
        if wishes.dns_servers:
            # Port 53 through the tunnel is allowed; port 53 anywhere else is not (no leak via other NICs).
            plan.add(_filter(f"dns-tunnel-v{fam}", connect, "PERMIT", W_PERMIT, tun_iface), None)
            for proto in (IPPROTO_UDP, IPPROTO_TCP):
                plan.add(
                    _filter(
                        f"dns-block-{'udp' if proto == IPPROTO_UDP else 'tcp'}-v{fam}",
                        connect,
                        "BLOCK",
                        W_DNS_BLOCK,
                        Condition("FWPM_CONDITION_IP_PROTOCOL", "FWP_MATCH_EQUAL", proto),
                        Condition("FWPM_CONDITION_IP_REMOTE_PORT", "FWP_MATCH_EQUAL", 53),
                    ),
                    None,
                )
        if wishes.kill_switch:
            _plan_kill_switch(plan, wishes, fam, tun_iface)


def _plan_kill_switch(plan: ApplyPlan, wishes: Wishes, fam: int, tun_iface: Condition) -> None:
    for layer, kind in ((CONNECT[fam], "out"), (ACCEPT[fam], "in")):
        plan.add(_filter(f"ks-tunnel-{kind}-v{fam}", layer, "PERMIT", W_PERMIT, tun_iface), None)
        loopback = Condition(
            "FWPM_CONDITION_FLAGS", "FWP_MATCH_FLAGS_ALL_SET", "FWP_CONDITION_FLAG_IS_LOOPBACK"
        )
        plan.add(_filter(f"ks-loopback-{kind}-v{fam}", layer, "PERMIT", W_PERMIT, loopback), None)
    for e in wishes.ssh_endpoints:
        if e.address.version != fam:
            continue
        port = (Condition("FWPM_CONDITION_IP_REMOTE_PORT", "FWP_MATCH_EQUAL", e.port),) if e.port else ()
        plan.add(
            _filter(
                f"ks-ssh-{e.address}-{e.port}" if e.port else f"ks-ssh-{e.address}",
                CONNECT[fam],
                "PERMIT",
                W_PERMIT,
                Condition("FWPM_CONDITION_ALE_APP_ID", "FWP_MATCH_EQUAL", wishes.app_path),
                Condition("FWPM_CONDITION_IP_PROTOCOL", "FWP_MATCH_EQUAL", IPPROTO_TCP),
                Condition("FWPM_CONDITION_IP_REMOTE_ADDRESS", "FWP_MATCH_EQUAL", e.address),
                *port,
            ),
            None,
        )
    for net in wishes.excludes:
        if net.version != fam:
            continue
        remote = Condition("FWPM_CONDITION_IP_REMOTE_ADDRESS", "FWP_MATCH_EQUAL", net)
        plan.add(_filter(f"ks-exclude-out-{net}", CONNECT[fam], "PERMIT", W_PERMIT, remote), None)
        plan.add(_filter(f"ks-exclude-in-{net}", ACCEPT[fam], "PERMIT", W_PERMIT, remote), None)
    # DHCP: client port 68 to server port 67; DHCPv6: 546 to 547.
    dhcp = (IPPROTO_UDP, 68, 67, "ks-dhcp-v4") if fam == 4 else (IPPROTO_UDP, 546, 547, "ks-dhcp-v6")
    plan.add(
        _filter(
            dhcp[3],
            CONNECT[fam],
            "PERMIT",
            W_PERMIT,
            Condition("FWPM_CONDITION_IP_PROTOCOL", "FWP_MATCH_EQUAL", dhcp[0]),
            Condition("FWPM_CONDITION_IP_LOCAL_PORT", "FWP_MATCH_EQUAL", dhcp[1]),
            Condition("FWPM_CONDITION_IP_REMOTE_PORT", "FWP_MATCH_EQUAL", dhcp[2]),
        ),
        None,
    )
    if fam == 6:
        # Neighbour discovery (router solicitation .. redirect, ICMPv6 types 133..137); at the ALE layers
        # the ICMP type is carried in the local-port field (FWPM_CONDITION_ICMP_TYPE).
        for layer, kind in ((CONNECT[6], "out"), (ACCEPT[6], "in")):
            plan.add(
                _filter(
                    f"ks-nd-{kind}",
                    layer,
                    "PERMIT",
                    W_PERMIT,
                    Condition("FWPM_CONDITION_IP_PROTOCOL", "FWP_MATCH_EQUAL", IPPROTO_ICMPV6),
                    Condition("FWPM_CONDITION_ICMP_TYPE", "FWP_MATCH_RANGE", (133, 137)),
                ),
                None,
            )
    for layer, kind in ((CONNECT[fam], "out"), (ACCEPT[fam], "in")):
        plan.add(_filter(f"ks-block-{kind}-v{fam}", layer, "BLOCK", W_BLOCK_ALL), None)


def interface_index(interface: Interface, executor: Executor) -> int:
    """Run a `ConvertInterfaceLuidToIndex` query: the Wintun adapter's index once it exists (found by its
    LUID, not by its name: Windows' if_nametoindex wants the internal name, not the alias)."""
    answer = executor.call(ConvertInterfaceLuidToIndex(interface))
    if not isinstance(answer, int) or isinstance(answer, bool) or answer <= 0:
        raise PlanError(f"ConvertInterfaceLuidToIndex for {interface} gave no index ({answer!r})")
    return answer


def lookup(wishes: Wishes, executor: Executor) -> dict[IPAddress, BestRoute]:
    """Run `lookup_plan` through the executor: each destination's original path, for `apply_plan`."""
    answers: dict[IPAddress, BestRoute] = {}
    for query in lookup_plan(wishes):
        answer = executor.call(query)
        if not isinstance(answer, BestRoute):
            raise PlanError(f"GetBestRoute2 for {query.destination} gave no route")
        answers[query.destination] = answer
    return answers
