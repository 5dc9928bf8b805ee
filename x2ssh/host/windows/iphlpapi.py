"""IP Helper rows built from plan records (pure: fills ctypes structures, calls nothing).

The executor first lets Windows initialise a row (InitializeUnicastIpAddressEntry / InitializeIpForwardEntry
set the lifetimes to infinite and the rest to defaults), then fills in what the plan says with these
functions. Keeping them apart from the calls lets the Linux tests check every field.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from x2ssh.host.windows import structs as S
from x2ssh.host.windows.plan import BestRoute, IPAddress, IPNetwork


def fill_unicast_row(
    row: S.MIB_UNICASTIPADDRESS_ROW, luid: int, address: IPv4Interface | IPv6Interface
) -> S.MIB_UNICASTIPADDRESS_ROW:
    """An address on an interface: the address, its on-link prefix, preferred at once (no DAD wait)."""
    row.Address = S.sockaddr_inet(address.ip)
    row.InterfaceLuid.Value = luid
    row.OnLinkPrefixLength = address.network.prefixlen
    row.DadState = S.IpDadStatePreferred
    return row


def fill_forward_row(
    row: S.MIB_IPFORWARD_ROW2, luid: int, destination: IPNetwork, next_hop: IPAddress, metric: int = 0
) -> S.MIB_IPFORWARD_ROW2:
    """A route: destination prefix via next hop (0.0.0.0 / :: for on-link) on an interface."""
    if destination.version != next_hop.version:
        raise ValueError(f"route {destination} via {next_hop}: address families differ")
    row.InterfaceLuid.Value = luid
    row.DestinationPrefix.Prefix = S.sockaddr_inet(destination.network_address)
    row.DestinationPrefix.PrefixLength = destination.prefixlen
    row.NextHop = S.sockaddr_inet(next_hop)
    row.Metric = metric
    row.Protocol = S.MIB_IPPROTO_NETMGMT
    return row


def best_route_answer(row: S.MIB_IPFORWARD_ROW2) -> BestRoute:
    """GetBestRoute2's row as the plan's `BestRoute`."""
    return BestRoute(row.InterfaceLuid.Value, S.sockaddr_address(row.NextHop))


def fill_interface_row(row: S.MIB_IPINTERFACE_ROW, mtu: int, metric: int) -> S.MIB_IPINTERFACE_ROW:
    """MTU and a fixed metric on a row read by GetIpInterfaceEntry, ready for SetIpInterfaceEntry."""
    row.NlMtu = mtu
    row.Metric = metric
    row.UseAutomaticMetric = False
    if row.Family == S.AF_INET:
        row.SitePrefixLength = 0  # SetIpInterfaceEntry refuses anything else for IPv4 (netioapi.h docs)
    return row


def dns_settings(family: int, servers: tuple[IPv4Address | IPv6Address, ...]) -> S.DNS_INTERFACE_SETTINGS:
    """DNS_INTERFACE_SETTINGS that set (or, with no servers, clear) one family's name servers."""
    settings = S.DNS_INTERFACE_SETTINGS()
    settings.Version = S.DNS_INTERFACE_SETTINGS_VERSION1
    settings.Flags = S.DNS_SETTING_NAMESERVER | (S.DNS_SETTING_IPV6 if family == S.AF_INET6 else 0)
    settings.NameServer = ",".join(str(s) for s in servers)
    return settings


def check(status: int, what: str, tolerate: tuple[int, ...] = ()) -> None:
    """Raise OSError for a failed NETIO_STATUS / DWORD result; `tolerate` lists codes that mean done."""
    if status != S.ERROR_SUCCESS and status not in tolerate:
        raise OSError(status, f"{what} failed with Windows error {status}")
