"""The exact routes planned for given servers, exclusions and original paths (pure, no root)."""

from ipaddress import ip_address as A
from ipaddress import ip_network as N

import pytest

from x2ssh.errors import RoutingError
from x2ssh.host.linux.routes import OriginalPath, PlannedRoute, plan_routes

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
