"""The exact routes and policy rules planned for given servers, exclusions, families and original paths
(pure, no root)."""

from ipaddress import ip_address as A
from ipaddress import ip_network as N

import pytest

from x2ssh.errors import RoutingError
from x2ssh.host.linux.routes import (
    FWMARK,
    PRIORITIES,
    PRIORITY_EXCLUDE,
    PRIORITY_SUPPRESS,
    PRIORITY_TUNNEL,
    TUNNEL_TABLE,
    OriginalPath,
    PlannedRoute,
    PolicyPlan,
    PolicyRule,
    SysctlSetting,
    plan_policy,
    plan_routes,
)

GW4 = OriginalPath(A("198.18.0.1"), "eth0", A("198.18.0.2"))
GW6 = OriginalPath(A("fe80::1"), "eth0", A("fd78:1::2"))
SPLITS = [
    PlannedRoute(N("0.0.0.0/1"), "x2ssh0", None, "tunnel"),
    PlannedRoute(N("128.0.0.0/1"), "x2ssh0", None, "tunnel"),
    PlannedRoute(N("::/1"), "x2ssh0", None, "tunnel"),
    PlannedRoute(N("8000::/1"), "x2ssh0", None, "tunnel"),
]


def default_routes(v6: bool = True):
    """Both families have a default route via eth0 (IPv6 optional); records what was asked."""
    asked = []

    def original(target):
        asked.append(target)
        if target.version == 4:
            return GW4
        return GW6 if v6 else None

    original.asked = asked
    return original


def test_server_only():
    plan = plan_routes("x2ssh0", [A("198.18.7.7")], [], default_routes())
    assert list(plan.routes) == [PlannedRoute(N("198.18.7.7/32"), "eth0", A("198.18.0.1"), "server"), *SPLITS]
    assert plan.skipped == ()


def test_ipv6_server_and_exclusions_in_order():
    original = default_routes()
    plan = plan_routes(
        "x2ssh0",
        [A("198.18.7.7"), A("fd78:7::7")],
        [N("198.18.100.0/24"), N("fd78:100::/48")],
        original,
    )
    assert list(plan.routes) == [
        PlannedRoute(N("198.18.7.7/32"), "eth0", A("198.18.0.1"), "server"),
        PlannedRoute(N("fd78:7::7/128"), "eth0", A("fe80::1"), "server"),
        PlannedRoute(N("198.18.100.0/24"), "eth0", A("198.18.0.1"), "exclude"),
        PlannedRoute(N("fd78:100::/48"), "eth0", A("fe80::1"), "exclude"),
        *SPLITS,
    ]
    # servers are looked up as addresses, exclusions as networks
    assert original.asked == [A("198.18.7.7"), A("fd78:7::7"), N("198.18.100.0/24"), N("fd78:100::/48")]


def test_proxyjump_hops_are_all_pinned_once():
    paths = {
        A("198.18.7.7"): OriginalPath(A("198.18.0.1"), "eth0"),
        A("198.18.8.8"): OriginalPath(None, "wlan0"),  # first hop on the local link
        A("198.18.9.9"): OriginalPath(A("198.18.0.254"), "eth1"),
    }
    plan = plan_routes(
        "x2ssh0",
        [A("198.18.8.8"), A("198.18.9.9"), A("198.18.7.7"), A("198.18.8.8")],
        [],
        paths.get,
    )
    assert list(plan.routes) == [
        PlannedRoute(N("198.18.8.8/32"), "wlan0", None, "server"),
        PlannedRoute(N("198.18.9.9/32"), "eth1", A("198.18.0.254"), "server"),
        PlannedRoute(N("198.18.7.7/32"), "eth0", A("198.18.0.1"), "server"),
        *SPLITS,
    ]


def test_missing_ipv6_default_route_skips_v6_pins_but_tunnel_still_catches_v6():
    plan = plan_routes(
        "x2ssh0", [A("198.18.7.7"), A("fd78:7::7")], [N("fd78:100::/48")], default_routes(v6=False)
    )
    assert list(plan.routes) == [PlannedRoute(N("198.18.7.7/32"), "eth0", A("198.18.0.1"), "server"), *SPLITS]
    assert plan.skipped == (
        "server fd78:7::7/128: no route to it now, not pinned",
        "exclude fd78:100::/48: no route to it now, not pinned",
    )


def test_exclusion_equal_to_a_half_replaces_that_tunnel_route():
    plan = plan_routes("tun9", [], [N("128.0.0.0/1")], lambda t: GW4)
    assert [(str(r.dst), r.dev, r.reason) for r in plan.routes] == [
        ("128.0.0.0/1", "eth0", "exclude"),
        ("0.0.0.0/1", "tun9", "tunnel"),
        ("::/1", "tun9", "tunnel"),
        ("8000::/1", "tun9", "tunnel"),
    ]


def test_server_inside_an_exclusion_keeps_its_host_route():
    plan = plan_routes("x2ssh0", [A("198.18.100.5")], [N("198.18.100.0/24")], default_routes())
    assert [str(r.dst) for r in plan.routes][:2] == ["198.18.100.5/32", "198.18.100.0/24"]


def test_original_path_through_the_tun_is_a_loop():
    with pytest.raises(RoutingError, match="loop"):
        plan_routes("x2ssh0", [A("198.18.7.7")], [], lambda t: OriginalPath(None, "x2ssh0"))


def test_no_servers_no_excludes_is_just_the_tunnel():
    assert list(plan_routes("x2ssh0", [], [], default_routes()).routes) == SPLITS


# -- policy routing (plan_policy) ----------------------------------------------------------------


def tunnel_rules(family):
    return [
        PolicyRule(family, 6831, 254, suppress_prefixlength=0, reason="specific"),
        PolicyRule(family, 6832, 0x7832, fwmark=0x7832, invert=True, reason="tunnel"),
    ]


def test_policy_constants():
    assert (FWMARK, TUNNEL_TABLE) == (0x7832, 30770)
    assert (PRIORITY_EXCLUDE, PRIORITY_SUPPRESS, PRIORITY_TUNNEL) == (6830, 6831, 6832)
    assert all(p in PRIORITIES for p in (PRIORITY_EXCLUDE, PRIORITY_SUPPRESS, PRIORITY_TUNNEL))
    assert max(PRIORITIES) < 32765  # before `lookup main` and any automatic `ip rule add` priority


def test_policy_plan_both_families_without_excludes():
    plan = plan_policy("x2ssh0", [])
    assert plan == PolicyPlan(
        sysctls=(SysctlSetting("net.ipv4.conf.all.src_valid_mark", "1"),),
        routes=(
            PlannedRoute(N("0.0.0.0/0"), "x2ssh0", None, "tunnel", 0x7832),
            PlannedRoute(N("::/0"), "x2ssh0", None, "tunnel", 0x7832),
        ),
        rules=(*tunnel_rules(4), *tunnel_rules(6)),
    )


def test_policy_plan_excludes_come_first_in_their_own_family_once():
    plan = plan_policy(
        "tun9", [N("fd78:100::/48"), N("198.18.100.0/24"), N("198.18.101.0/24"), N("198.18.100.0/24")]
    )
    assert list(plan.rules) == [
        PolicyRule(4, 6830, 254, dst=N("198.18.100.0/24"), reason="exclude"),
        PolicyRule(4, 6830, 254, dst=N("198.18.101.0/24"), reason="exclude"),
        *tunnel_rules(4),
        PolicyRule(6, 6830, 254, dst=N("fd78:100::/48"), reason="exclude"),
        *tunnel_rules(6),
    ]
    assert [r.dev for r in plan.routes] == ["tun9", "tun9"]


def test_policy_plan_ipv4_only_drops_ipv6_excludes_and_routes():
    plan = plan_policy("x2ssh0", [N("fd78:100::/48"), N("198.18.100.0/24")], families=(4,))
    assert plan.routes == (PlannedRoute(N("0.0.0.0/0"), "x2ssh0", None, "tunnel", 0x7832),)
    assert list(plan.rules) == [
        PolicyRule(4, 6830, 254, dst=N("198.18.100.0/24"), reason="exclude"),
        *tunnel_rules(4),
    ]
    assert plan.sysctls == (SysctlSetting("net.ipv4.conf.all.src_valid_mark", "1"),)


def test_policy_plan_ipv6_only_needs_no_ipv4_sysctl():
    plan = plan_policy("x2ssh0", [N("198.18.100.0/24")], families=[6])
    assert plan.sysctls == ()
    assert plan.routes == (PlannedRoute(N("::/0"), "x2ssh0", None, "tunnel", 0x7832),)
    assert list(plan.rules) == tunnel_rules(6)


@pytest.mark.parametrize("families", [(), (5,), (4, 46)])
def test_policy_plan_refuses_unknown_families(families):
    with pytest.raises(ValueError, match="families"):
        plan_policy("x2ssh0", [], families)
