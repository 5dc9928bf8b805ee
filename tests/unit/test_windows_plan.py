"""The Windows host plans, run through a recording fake executor: exact call lists and undo order."""

from __future__ import annotations

from ipaddress import ip_address, ip_interface, ip_network

import pytest

from x2ssh.host.api import TUN_V4, TUN_V6
from x2ssh.host.windows import plan as P

SERVER = P.Endpoint(ip_address("198.18.0.10"), 22)
UPLINK = 0x0006000000000000  # a NET_LUID of an Ethernet adapter (IfType 6 in the high bits)
GATEWAY = ip_address("198.18.0.1")
BEST = {ip_address("198.18.0.10"): P.BestRoute(UPLINK, GATEWAY)}


class Recorder:
    """A fake executor: records every call; fails on the call given to `fail_on`."""

    def __init__(self, fail_on: P.Call | None = None) -> None:
        self.calls: list[P.Call] = []
        self.fail_on = fail_on

    def call(self, record: P.Call) -> object:
        self.calls.append(record)
        if record == self.fail_on:
            raise OSError(5, "access denied")
        return None


def wishes(**kw) -> P.Wishes:
    base = dict(tun="x2ssh", mtu=1400, ssh_endpoints=(SERVER,))
    base.update(kw)
    return P.Wishes(**base)


def test_lookup_plan_asks_for_each_endpoint_and_exclude_once() -> None:
    w = wishes(
        ssh_endpoints=(SERVER, P.Endpoint(ip_address("198.18.0.10"), 2222)),
        excludes=(ip_network("198.19.0.0/16"),),
    )
    assert P.lookup_plan(w) == [
        P.GetBestRoute2(ip_address("198.18.0.10")),
        P.GetBestRoute2(ip_address("198.19.0.0")),
    ]


def test_minimal_plan_exact_calls_and_undo() -> None:
    plan = P.apply_plan(wishes(), BEST)
    tun = P.TUN
    v4_hop, v6_hop = ip_address("0.0.0.0"), ip_address("::")
    assert plan.apply == [
        P.WintunCreateAdapter("x2ssh"),
        P.SetIpInterfaceEntry(tun, P.AF_INET, 1400, P.INTERFACE_METRIC),
        P.SetIpInterfaceEntry(tun, P.AF_INET6, 1400, P.INTERFACE_METRIC),
        P.CreateUnicastIpAddressEntry(tun, TUN_V4),
        P.CreateUnicastIpAddressEntry(tun, TUN_V6),
        P.CreateIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY, P.PINNED_METRIC),
        P.CreateIpForwardEntry2(tun, ip_network("0.0.0.0/1"), v4_hop, P.TUNNEL_METRIC),
        P.CreateIpForwardEntry2(tun, ip_network("128.0.0.0/1"), v4_hop, P.TUNNEL_METRIC),
        P.CreateIpForwardEntry2(tun, ip_network("::/1"), v6_hop, P.TUNNEL_METRIC),
        P.CreateIpForwardEntry2(tun, ip_network("8000::/1"), v6_hop, P.TUNNEL_METRIC),
    ]
    assert plan.undo == [
        P.DeleteIpForwardEntry2(tun, ip_network("8000::/1"), v6_hop),
        P.DeleteIpForwardEntry2(tun, ip_network("::/1"), v6_hop),
        P.DeleteIpForwardEntry2(tun, ip_network("128.0.0.0/1"), v4_hop),
        P.DeleteIpForwardEntry2(tun, ip_network("0.0.0.0/1"), v4_hop),
        P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY),
        P.DeleteUnicastIpAddressEntry(tun, TUN_V6),
        P.DeleteUnicastIpAddressEntry(tun, TUN_V4),
        P.WintunCloseAdapter("x2ssh"),
    ]


def test_excludes_keep_their_original_path_and_v6_off_drops_v6() -> None:
    lan = P.BestRoute(0x1234, ip_address("0.0.0.0"))
    best = dict(BEST)
    best[ip_address("198.19.0.0")] = lan
    plan = P.apply_plan(wishes(excludes=(ip_network("198.19.0.0/16"),), v6=None), best)
    routes = [c for c in plan.apply if isinstance(c, P.CreateIpForwardEntry2)]
    assert routes[:2] == [
        P.CreateIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY, P.PINNED_METRIC),
        P.CreateIpForwardEntry2(0x1234, ip_network("198.19.0.0/16"), ip_address("0.0.0.0"), 0),
    ]
    assert all(r.destination.version == 4 for r in routes)
    assert P.CreateUnicastIpAddressEntry(P.TUN, TUN_V6) not in plan.apply


def test_dns_api_plan_and_filters_keep_queries_in_the_tunnel() -> None:
    servers = (ip_address("100.100.83.53"), ip_address("fd78:7832:7373::53"))
    plan = P.apply_plan(wishes(dns_servers=servers), BEST)
    dns = [c for c in plan.apply if isinstance(c, P.SetInterfaceDnsSettings)]
    assert dns == [
        P.SetInterfaceDnsSettings(P.TUN, P.AF_INET, (servers[0],)),
        P.SetInterfaceDnsSettings(P.TUN, P.AF_INET6, (servers[1],)),
    ]
    names = [(c.name, c.action) for c in plan.apply if isinstance(c, P.FwpmFilterAdd)]
    assert names == [
        ("dns-tunnel-v4", "PERMIT"),
        ("dns-block-udp-v4", "BLOCK"),
        ("dns-block-tcp-v4", "BLOCK"),
        ("dns-tunnel-v6", "PERMIT"),
        ("dns-block-udp-v6", "BLOCK"),
        ("dns-block-tcp-v6", "BLOCK"),
    ]
    # The WFP session is the first undo (it opened last among the undoable steps); DNS cleared before it.
    assert plan.undo[:3] == [
        P.FwpmEngineClose(),
        P.SetInterfaceDnsSettings(P.TUN, P.AF_INET6, ()),
        P.SetInterfaceDnsSettings(P.TUN, P.AF_INET, ()),
    ]
    block = next(c for c in plan.apply if isinstance(c, P.FwpmFilterAdd) and c.name == "dns-block-udp-v4")
    assert block.conditions == (
        P.Condition("FWPM_CONDITION_IP_PROTOCOL", "FWP_MATCH_EQUAL", 17),
        P.Condition("FWPM_CONDITION_IP_REMOTE_PORT", "FWP_MATCH_EQUAL", 53),
    )
    assert block.weight < next(c for c in plan.apply if isinstance(c, P.FwpmFilterAdd)).weight


def test_netsh_fallback_plan() -> None:
    servers = (ip_address("100.100.83.53"), ip_address("198.18.0.53"))
    plan = P.apply_plan(wishes(dns_servers=servers, dns_api=False, v6=None), BEST)
    netsh = [c.argv for c in plan.apply if isinstance(c, P.Netsh)]
    assert netsh == [
        (
            "netsh", "interface", "ipv4", "set", "dnsservers", "name=x2ssh", "source=static",
            "address=100.100.83.53", "register=none", "validate=no",
        ),
        ("netsh", "interface", "ipv4", "add", "dnsservers", "name=x2ssh", "address=198.18.0.53", "index=2",
         "validate=no"),
    ]  # fmt: skip
    assert P.Netsh(("netsh", "interface", "ipv4", "set", "dnsservers", "name=x2ssh", "source=dhcp")) in (
        plan.undo
    )
    assert not any(isinstance(c, P.SetInterfaceDnsSettings) for c in plan.apply)


def test_kill_switch_filters() -> None:
    w = wishes(kill_switch=True, app_path=r"C:\Python311\python.exe", excludes=(ip_network("198.19.0.0/16"),))
    best = dict(BEST)
    best[ip_address("198.19.0.0")] = P.BestRoute(UPLINK, GATEWAY)
    plan = P.apply_plan(w, best)
    filters = [c for c in plan.apply if isinstance(c, P.FwpmFilterAdd)]
    assert [f.name for f in filters] == [
        "ks-tunnel-out-v4", "ks-loopback-out-v4", "ks-tunnel-in-v4", "ks-loopback-in-v4",
        "ks-ssh-198.18.0.10-22", "ks-exclude-out-198.19.0.0/16", "ks-exclude-in-198.19.0.0/16",
        "ks-dhcp-v4", "ks-block-out-v4", "ks-block-in-v4",
        "ks-tunnel-out-v6", "ks-loopback-out-v6", "ks-tunnel-in-v6", "ks-loopback-in-v6",
        "ks-dhcp-v6", "ks-nd-out", "ks-nd-in", "ks-block-out-v6", "ks-block-in-v6",
    ]  # fmt: skip
    ssh = filters[4]
    assert ssh.layer == "FWPM_LAYER_ALE_AUTH_CONNECT_V4" and ssh.action == "PERMIT"
    assert ssh.conditions == (
        P.Condition("FWPM_CONDITION_ALE_APP_ID", "FWP_MATCH_EQUAL", r"C:\Python311\python.exe"),
        P.Condition("FWPM_CONDITION_IP_PROTOCOL", "FWP_MATCH_EQUAL", 6),
        P.Condition("FWPM_CONDITION_IP_REMOTE_ADDRESS", "FWP_MATCH_EQUAL", SERVER.address),
        P.Condition("FWPM_CONDITION_IP_REMOTE_PORT", "FWP_MATCH_EQUAL", 22),
    )
    blocks = [f for f in filters if f.action == "BLOCK"]
    permits = [f for f in filters if f.action == "PERMIT"]
    assert all(b.conditions == () for b in blocks)
    assert max(b.weight for b in blocks) < min(p.weight for p in permits)
    # One engine, dynamic; closing it is the whole WFP undo.
    assert plan.apply.count(P.FwpmEngineOpen(dynamic=True)) == 1
    assert plan.undo.count(P.FwpmEngineClose()) == 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(ssh_endpoints=()), "no SSH server endpoint"),
        (dict(mtu=100), "MTU 100"),
        (dict(tun=""), "adapter name"),
        (dict(kill_switch=True), "app id"),
    ],
)
def test_bad_wishes_are_refused_with_a_reason(kw, message) -> None:
    with pytest.raises(P.PlanError, match=message):
        P.apply_plan(wishes(**kw), BEST)


def test_missing_best_route_is_refused() -> None:
    with pytest.raises(P.PlanError, match=r"no original route known for 198\.18\.0\.10"):
        P.apply_plan(wishes(), {})


def test_execute_applies_in_order_and_returns_the_undo_list() -> None:
    plan = P.apply_plan(wishes(kill_switch=True, app_path="x"), BEST)
    rec = Recorder()
    undo = P.execute(plan, rec)
    assert rec.calls == plan.apply
    assert undo == plan.undo
    rec.calls.clear()
    assert P.undo_all(undo, rec) == []
    assert rec.calls == plan.undo


def test_execute_rolls_back_newest_first_when_a_call_fails() -> None:
    plan = P.apply_plan(wishes(), BEST)
    failing = P.CreateIpForwardEntry2(P.TUN, ip_network("0.0.0.0/1"), ip_address("0.0.0.0"), 1)
    rec = Recorder(fail_on=failing)
    with pytest.raises(OSError, match="access denied"):
        P.execute(plan, rec)
    at = rec.calls.index(failing)
    assert rec.calls[: at + 1] == plan.apply[: at + 1]
    assert rec.calls[at + 1 :] == [
        P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY),
        P.DeleteUnicastIpAddressEntry(P.TUN, TUN_V6),
        P.DeleteUnicastIpAddressEntry(P.TUN, TUN_V4),
        P.WintunCloseAdapter("x2ssh"),
    ]


def test_undo_all_goes_on_past_failures() -> None:
    undo = [P.WintunCloseAdapter("a"), P.FwpmEngineClose()]
    rec = Recorder(fail_on=P.WintunCloseAdapter("a"))
    failures = P.undo_all(undo, rec)
    assert rec.calls == undo
    assert len(failures) == 1 and "access denied" in failures[0]


def test_v4_address_is_the_shared_tunnel_address() -> None:
    assert P.Wishes("t", 1400, (SERVER,)).v4 == ip_interface("100.100.83.1/24")


def test_lookup_runs_the_queries_and_refuses_a_missing_answer() -> None:
    class Answers(Recorder):
        def call(self, record: P.Call) -> object:
            super().call(record)
            return BEST.get(record.destination) if isinstance(record, P.GetBestRoute2) else None

    rec = Answers()
    assert P.lookup(wishes(), rec) == BEST
    assert rec.calls == [P.GetBestRoute2(ip_address("198.18.0.10"))]
    with pytest.raises(P.PlanError, match="gave no route"):
        P.lookup(wishes(excludes=(ip_network("198.19.0.0/16"),)), Answers())


def test_without_ipv6_in_the_tunnel_ipv6_is_still_filtered() -> None:
    w = wishes(v6=None, kill_switch=True, app_path="x", dns_servers=(ip_address("100.100.83.53"),))
    names = [c.name for c in P.apply_plan(w, BEST).apply if isinstance(c, P.FwpmFilterAdd)]
    assert {"dns-block-udp-v6", "dns-block-tcp-v6", "ks-block-out-v6", "ks-block-in-v6"} <= set(names)
    assert "ks-tunnel-out-v6" in names  # harmless: the adapter has no IPv6 address then


@pytest.mark.parametrize("answer", [None, 0, -1, True, "23"])
def test_an_interface_index_query_without_a_usable_answer_is_refused(answer: object) -> None:
    class Answers:
        def call(self, record: P.Call) -> object:
            assert record == P.ConvertInterfaceLuidToIndex(P.TUN)
            return answer

    with pytest.raises(P.PlanError, match="ConvertInterfaceLuidToIndex for wintun gave no index"):
        P.interface_index(P.TUN, Answers())


def test_an_interface_index_query_returns_the_index() -> None:
    class Answers:
        def call(self, record: P.Call) -> object:
            return 23 if record == P.ConvertInterfaceLuidToIndex(P.TUN) else None

    assert P.interface_index(P.TUN, Answers()) == 23
