"""UdpRelay against a recording fake agent link: flow keying, replies, expiry, caps and the DNS override."""

from __future__ import annotations

import pytest

from agent.protocol import MAX_PAYLOAD, SERVER_RESOLVER
from x2ssh.flows.udp_relay import DnsOverride, UdpRelay, UdpRelaySettings

APP = ("100.100.83.1", 40000)
APP2 = ("100.100.83.1", 40001)
APP6 = ("fd78:7832:7373::1", 40000)
TARGET = ("198.19.0.2", 7000)
TARGET_DNS = ("198.19.0.2", 53)
TUNNEL_DNS4 = ("100.100.83.53", 53)
TUNNEL_DNS6 = ("fd78:7832:7373::53", 53)


class FakeAgent:
    def __init__(self) -> None:
        self.receiver = None
        self.opened: list[tuple[int, tuple[str, int]]] = []
        self.sent: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.accept = True

    def set_receiver(self, receiver) -> None:
        self.receiver = receiver

    def open_flow(self, flow_id: int, destination: tuple[str, int]) -> None:
        self.opened.append((flow_id, destination))

    def send_datagram(self, flow_id: int, payload: bytes) -> bool:
        if self.accept:
            self.sent.append((flow_id, payload))
        return self.accept

    def close_flow(self, flow_id: int) -> None:
        self.closed.append(flow_id)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def to_app() -> list[tuple[tuple[str, int], tuple[str, int], bytes]]:
    return []


def make_relay(to_app, clock, settings=None, dns_override=None) -> tuple[UdpRelay, FakeAgent]:
    relay = UdpRelay(lambda src, dst, data: to_app.append((src, dst, data)), settings, dns_override, clock)
    agent = FakeAgent()
    relay.attach(agent)
    assert agent.receiver is relay
    return relay, agent


def test_without_agent_datagrams_are_dropped_and_counted(to_app, clock) -> None:
    relay = UdpRelay(lambda *a: to_app.append(a), clock=clock)
    relay.datagram_from_app(APP, TARGET, b"x")
    assert relay.stats.drops["no_agent"] == 1
    assert relay.flow_count == 0


def test_flows_are_keyed_by_app_source_and_destination(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"a")
    relay.datagram_from_app(APP, TARGET, b"b")
    relay.datagram_from_app(APP2, TARGET, b"c")  # another source port: another flow
    relay.datagram_from_app(APP, TARGET_DNS, b"d")  # another destination: another flow
    relay.datagram_from_app(APP6, ("fd58:3278:7373:2::2", 7000), b"e")
    assert [dst for _, dst in agent.opened] == [TARGET, TARGET, TARGET_DNS, ("fd58:3278:7373:2::2", 7000)]
    ids = [flow_id for flow_id, _ in agent.opened]
    assert len(set(ids)) == 4
    assert agent.sent == [(ids[0], b"a"), (ids[0], b"b"), (ids[1], b"c"), (ids[2], b"d"), (ids[3], b"e")]
    assert relay.stats.datagrams_to_agent == 5
    assert relay.stats.bytes_to_agent == 5
    assert relay.flow_count == 4


def test_reply_goes_to_the_app_from_the_address_it_came_from(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"ping")
    flow_id = agent.opened[0][0]
    relay.datagram_from_agent(flow_id, TARGET, b"pong")
    relay.datagram_from_agent(flow_id, ("198.19.0.2", 7001), b"from another port")
    relay.datagram_from_agent(flow_id, ("198.19.0.3", 9), b"from another host")
    assert to_app == [
        (TARGET, APP, b"pong"),
        (("198.19.0.2", 7001), APP, b"from another port"),
        (("198.19.0.3", 9), APP, b"from another host"),
    ]
    assert relay.stats.datagrams_to_app == 3


def test_reply_for_an_unknown_flow_is_dropped(to_app, clock) -> None:
    relay, _ = make_relay(to_app, clock)
    relay.datagram_from_agent(99, TARGET, b"late")
    assert to_app == []
    assert relay.stats.drops["unknown_flow"] == 1


def test_idle_expiry_dns_fast_others_slow(to_app, clock) -> None:
    settings = UdpRelaySettings(idle_timeout=60.0, dns_idle_timeout=10.0)
    relay, agent = make_relay(to_app, clock, settings)
    assert relay.next_deadline() is None
    relay.datagram_from_app(APP, TARGET_DNS, b"q")
    relay.datagram_from_app(APP, TARGET, b"x")
    dns_id, other_id = (flow_id for flow_id, _ in agent.opened)
    assert relay.next_deadline() == 1010.0
    assert relay.expire(1009.9) == 0
    assert relay.expire(1010.0) == 1
    assert agent.closed == [dns_id]
    assert relay.next_deadline() == 1060.0
    clock.now = 1050.0
    relay.datagram_from_agent(other_id, TARGET, b"reply keeps it alive")
    assert relay.next_deadline() == 1110.0
    assert relay.expire(1100.0) == 0
    assert relay.expire(1110.0) == 1
    assert agent.closed == [dns_id, other_id]
    assert relay.next_deadline() is None
    assert relay.stats.flows_expired == 2
    # An expired flow reopens with a fresh id on the next datagram.
    relay.datagram_from_app(APP, TARGET, b"again")
    assert agent.opened[-1][0] not in (dns_id, other_id)


def test_expiry_follows_recency_not_creation_order(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock, UdpRelaySettings(idle_timeout=60.0))
    relay.datagram_from_app(APP, TARGET, b"1")
    clock.now += 30
    relay.datagram_from_app(APP2, TARGET, b"2")
    clock.now += 20
    relay.datagram_from_app(APP, TARGET, b"3")  # the first flow is now the most recent
    first, second = (flow_id for flow_id, _ in agent.opened)
    assert relay.next_deadline() == 1030.0 + 60
    relay.expire(1090.0)
    assert agent.closed == [second]
    assert relay.flow_count == 1
    assert [f[0] for f in relay.flows()] == [first]


def test_flow_cap_drops_and_counts(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock, UdpRelaySettings(max_flows=2))
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.datagram_from_app(APP2, TARGET, b"2")
    relay.datagram_from_app(("100.100.83.1", 40002), TARGET, b"3")
    relay.datagram_from_app(APP, TARGET, b"existing flows still work")
    assert len(agent.opened) == 2
    assert relay.stats.drops["flow_limit"] == 1
    assert len(agent.sent) == 3


def test_agent_backpressure_and_oversized_are_dropped_and_counted(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    agent.accept = False
    relay.datagram_from_app(APP, TARGET, b"x")
    relay.datagram_from_app(APP, TARGET, b"x" * (MAX_PAYLOAD + 1))
    assert relay.stats.drops == {"agent_backpressure": 1, "oversized": 1}
    assert relay.stats.datagrams_to_agent == 0


def test_agent_closing_a_flow_makes_the_next_datagram_reopen(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    first = agent.opened[0][0]
    relay.flow_closed_by_agent(first, 1)
    relay.flow_closed_by_agent(first, 1)  # twice is harmless
    relay.datagram_from_app(APP, TARGET, b"2")
    assert len(agent.opened) == 2
    assert agent.opened[1][0] != first
    assert relay.stats.flows_closed_by_agent == 1


@pytest.mark.parametrize(("tunnel", "app"), [(TUNNEL_DNS4, APP), (TUNNEL_DNS6, APP6)])
def test_dns_override_to_the_server_resolver(to_app, clock, tunnel, app) -> None:
    override = DnsOverride((TUNNEL_DNS4, ("FD78:7832:7373:0::53", 53)))
    relay, agent = make_relay(to_app, clock, dns_override=override)
    relay.datagram_from_app(app, tunnel, b"query")
    flow_id, destination = agent.opened[0]
    assert destination == SERVER_RESOLVER
    relay.datagram_from_agent(flow_id, ("198.18.0.1", 53), b"answer")  # the real resolver answers
    assert to_app == [(tunnel, app, b"answer")]  # ...but the app sees the tunnel address
    assert relay.next_deadline() == clock.now + relay.settings.dns_idle_timeout


def test_dns_override_to_an_explicit_server(to_app, clock) -> None:
    override = DnsOverride((TUNNEL_DNS4,), upstream=("198.19.0.2", 53))
    relay, agent = make_relay(to_app, clock, dns_override=override)
    relay.datagram_from_app(APP, TUNNEL_DNS4, b"q")
    relay.datagram_from_app(APP, ("198.19.0.9", 53), b"other servers are not redirected")
    assert [dst for _, dst in agent.opened] == [("198.19.0.2", 53), ("198.19.0.9", 53)]
    relay.datagram_from_agent(agent.opened[0][0], ("198.19.0.2", 53), b"a")
    relay.datagram_from_agent(agent.opened[1][0], ("198.19.0.9", 53), b"b")
    assert to_app == [(TUNNEL_DNS4, APP, b"a"), (("198.19.0.9", 53), APP, b"b")]


def test_detach_forgets_flows_and_reattach_starts_fresh(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.detach()
    assert agent.receiver is None
    assert relay.flow_count == 0
    relay.datagram_from_app(APP, TARGET, b"dropped")
    assert relay.stats.drops["no_agent"] == 1
    second = FakeAgent()
    relay.attach(second)
    relay.datagram_from_app(APP, TARGET, b"2")
    assert second.sent and second.opened[0][1] == TARGET


def test_agent_lost_detaches(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.agent_lost("connection closed")
    assert agent.receiver is None
    assert not relay.attached
    assert relay.flow_count == 0


def test_close_all_tells_the_agent(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.datagram_from_app(APP2, TARGET, b"2")
    relay.close_all()
    assert sorted(agent.closed) == sorted(flow_id for flow_id, _ in agent.opened)
    assert relay.flow_count == 0
