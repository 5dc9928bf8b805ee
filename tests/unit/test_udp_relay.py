"""UdpRelay against a recording fake agent link: flow keying, replies, expiry, caps and the DNS override."""

from __future__ import annotations

import pytest

from agent import protocol as p
from agent.protocol import MAX_PAYLOAD, SERVER_RESOLVER
from x2ssh.agent_client.link import ServerPython
from x2ssh.flows.udp_relay import (
    RECENCY_STEP,
    DnsOverride,
    UdpRelay,
    UdpRelaySettings,
    ping_refusal_reason,
)

APP = ("100.100.83.1", 40000)
APP2 = ("100.100.83.1", 40001)
APP6 = ("fd78:7832:7373::1", 40000)
TARGET = ("198.19.0.2", 7000)
TARGET_DNS = ("198.19.0.2", 53)
TUNNEL_DNS4 = ("100.100.83.53", 53)
TUNNEL_DNS6 = ("fd78:7832:7373::53", 53)


class FakeAgent:
    def __init__(self, platform: str = "linux") -> None:
        self.python = ServerPython("python3", (3, 11), platform, "/usr/bin/python3")
        self.receiver = None
        self.opened: list[tuple[int, tuple[str, int]]] = []
        self.sent: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.echoes: list[tuple[int, int, bytes]] = []
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

    supports_icmp = True

    def open_echo(self, flow_id: int, destination: str) -> None:
        self.opened.append((flow_id, (destination, 0)))

    def send_echo(self, flow_id: int, seq: int, payload: bytes) -> bool:
        self.echoes.append((flow_id, seq, payload))
        return self.accept


class FakeIcmp:
    """Records what the relay asks the netstack to send the apps."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def echo_reply(self, target, app, ident, seq, payload) -> None:
        self.sent.append(("reply", target, app, ident, seq, payload))

    def unreachable(self, reporter, app, dst, code, echo) -> None:
        self.sent.append(("unreachable", reporter, app, dst, code, echo))


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


def make_relay(to_app, clock, settings=None, dns_override=None, icmp=None) -> tuple[UdpRelay, FakeAgent]:
    relay = UdpRelay(
        lambda src, dst, data: to_app.append((src, dst, data)), settings, dns_override, clock, icmp=icmp
    )
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


def test_replies_only_from_the_destination_reach_the_app(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"ping")
    flow_id = agent.opened[0][0]
    relay.datagram_from_agent(flow_id, TARGET, b"pong")
    relay.datagram_from_agent(flow_id, ("198.19.0.2", 7001), b"from another port")
    relay.datagram_from_agent(flow_id, ("198.19.0.3", 9), b"from another host")
    assert to_app == [(TARGET, APP, b"pong")]
    assert relay.stats.datagrams_to_app == 1
    assert relay.stats.drops["wrong_source"] == 2


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


def test_detach_keeps_flows_for_a_resume_and_a_new_agent_starts_fresh(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.detach()
    assert agent.receiver is None
    assert relay.flow_count == 1  # the agent keeps the socket for a while: so do we
    relay.datagram_from_app(APP, TARGET, b"dropped")
    assert relay.stats.drops["no_agent"] == 1
    second = FakeAgent()
    relay.attach(second)
    assert relay.flow_count == 0
    relay.datagram_from_app(APP, TARGET, b"2")
    assert second.sent and second.opened[0][1] == TARGET


def test_resumed_agent_carries_on_with_the_same_flows(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    flow_id = agent.opened[0][0]
    relay.agent_lost("connection lost")
    again = FakeAgent()
    relay.attach(again, resumed=True)
    relay.datagram_from_app(APP, TARGET, b"2")
    assert again.opened == []  # no new flow: the agent's socket (and its port) is the same
    assert again.sent == [(flow_id, b"2")]
    relay.datagram_from_agent(flow_id, TARGET, b"reply")
    assert to_app == [(TARGET, APP, b"reply")]


def test_agent_lost_detaches(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.agent_lost("connection closed")
    assert agent.receiver is None
    assert not relay.attached


def test_close_all_tells_the_agent(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock)
    relay.datagram_from_app(APP, TARGET, b"1")
    relay.datagram_from_app(APP2, TARGET, b"2")
    relay.close_all()
    assert sorted(agent.closed) == sorted(flow_id for flow_id, _ in agent.opened)
    assert relay.flow_count == 0


# --- DNS flows end with their answer ------------------------------------------------------------------


def test_dns_flow_ends_when_every_query_is_answered(to_app, clock) -> None:
    override = DnsOverride((TUNNEL_DNS4,))
    relay, agent = make_relay(to_app, clock, dns_override=override)
    relay.datagram_from_app(APP, TUNNEL_DNS4, b"\x12\x34 A query")
    relay.datagram_from_app(APP, TUNNEL_DNS4, b"\xab\xcd AAAA query")  # glibc asks both on one socket
    flow_id = agent.opened[0][0]
    relay.datagram_from_agent(flow_id, ("198.18.0.1", 53), b"\xab\xcd AAAA answer")
    assert relay.flow_count == 1 and agent.closed == []
    relay.datagram_from_agent(flow_id, ("198.18.0.1", 53), b"\x12\x34 A answer")
    assert relay.flow_count == 0
    assert agent.closed == [flow_id]
    assert relay.stats.dns_answered == 1
    assert [data for _, _, data in to_app] == [b"\xab\xcd AAAA answer", b"\x12\x34 A answer"]
    relay.datagram_from_app(APP, TUNNEL_DNS4, b"\x55\x66 next lookup")
    assert agent.opened[-1][0] != flow_id


def test_unanswered_dns_flow_still_expires(to_app, clock) -> None:
    relay, agent = make_relay(to_app, clock, UdpRelaySettings(dns_idle_timeout=10.0))
    relay.datagram_from_app(APP, TARGET_DNS, b"\x00\x01 query nobody answers")
    assert relay.expire(clock.now + 10.0) == 1
    assert agent.closed == [agent.opened[0][0]]


# --- ICMP ----------------------------------------------------------------------------------------------


def test_echo_flow_relays_real_replies_with_the_apps_identifier(to_app, clock) -> None:
    icmp = FakeIcmp()
    relay, agent = make_relay(to_app, clock, icmp=icmp)
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 0x4242, 1, b"abc")
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 0x4242, 2, b"abc")
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 0x4343, 1, b"another ping process")
    (first, dst1), (second, _) = agent.opened
    assert dst1 == ("198.19.0.2", 0)
    assert agent.echoes == [(first, 1, b"abc"), (first, 2, b"abc"), (second, 1, b"another ping process")]
    relay.echo_from_agent(first, 2, b"abc")
    assert icmp.sent == [("reply", "198.19.0.2", "100.100.83.1", 0x4242, 2, b"abc")]
    relay.datagram_from_agent(first, TARGET, b"not a datagram flow")
    assert relay.stats.drops["unknown_flow"] == 1


def test_ping_not_permitted_gives_prohibited_at_once_and_logs_once(to_app, clock, caplog) -> None:
    icmp = FakeIcmp()
    relay, agent = make_relay(to_app, clock, icmp=icmp)
    relay.echo_from_app("fd78:7832:7373::1", "fd58:3278:7373:2::2", 7, 1, b"x")
    flow_id = agent.opened[0][0]
    relay.flow_closed_by_agent(flow_id, p.CLOSE_NOT_PERMITTED)
    relay.echo_from_app("fd78:7832:7373::1", "fd58:3278:7373:2::2", 7, 2, b"x")
    relay.echo_from_app("fd78:7832:7373::1", "fd58:3278:7373:2::2", 7, 3, b"x")
    assert len(agent.opened) == 1  # no more asking the agent
    expected = [
        ("unreachable", "fd58:3278:7373:2::2", ("fd78:7832:7373::1", 7), ("fd58:3278:7373:2::2", seq),
         p.UNREACH_PROHIBITED, True)
        for seq in (1, 2, 3)
    ]  # fmt: skip
    assert icmp.sent == expected
    assert len([r for r in caplog.records if "ping_group_range" in r.getMessage()]) == 1
    assert "Windows" not in relay.ping_refused
    relay.attach(FakeAgent())  # a new agent (another server setup) gets a new chance
    assert relay.ping_refused is None


def test_ping_not_permitted_on_a_windows_server_says_why_there(to_app, clock, caplog) -> None:
    """The Windows agent has no ping sockets at all: the server's ping_group_range is beside the point."""
    icmp = FakeIcmp()
    relay, _ = make_relay(to_app, clock, icmp=icmp)
    windows_agent = FakeAgent(platform="win32")
    relay.attach(windows_agent)
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 7, 1, b"x")
    ((flow_id, _),) = windows_agent.opened
    relay.flow_closed_by_agent(flow_id, p.CLOSE_NOT_PERMITTED)
    assert icmp.sent == [("unreachable", "198.19.0.2", ("100.100.83.1", 7), ("198.19.0.2", 1),
                          p.UNREACH_PROHIBITED, True)]  # fmt: skip
    (record,) = [r for r in caplog.records if "ping" in r.getMessage()]
    assert "Windows" in record.getMessage() and "ping_group_range" not in record.getMessage()
    assert relay.ping_refused == ping_refusal_reason("win32")


@pytest.mark.parametrize(
    ("platform", "says", "not_says"),
    [
        ("linux", "ping_group_range", "Windows"),
        ("win32", "Windows", "ping_group_range"),
        ("freebsd14", "freebsd14", "ping_group_range"),
        ("", "unknown", "ping_group_range"),
    ],
)
def test_ping_refusal_reason_fits_the_servers_os(platform, says, not_says) -> None:
    reason = ping_refusal_reason(platform)
    assert says in reason and not_says not in reason
    assert reason.endswith("pings get 'administratively prohibited'")


def test_refuse_pings_without_agent(to_app, clock) -> None:
    icmp = FakeIcmp()
    relay = UdpRelay(lambda *a: None, clock=clock, icmp=icmp)
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 1, 1, b"")
    assert icmp.sent == [] and relay.stats.drops["no_agent"] == 1
    relay.refuse_pings("no python3 on the server")
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 1, 2, b"")
    assert icmp.sent == [
        ("unreachable", "198.19.0.2", ("100.100.83.1", 1), ("198.19.0.2", 2), p.UNREACH_PROHIBITED, True)
    ]


def test_unreachable_reaches_the_app_as_its_destination_saw_it(to_app, clock) -> None:
    icmp = FakeIcmp()
    override = DnsOverride((TUNNEL_DNS4,))
    relay, agent = make_relay(to_app, clock, dns_override=override, icmp=icmp)
    relay.datagram_from_app(APP, TARGET, b"to a closed port")
    relay.datagram_from_app(APP2, TUNNEL_DNS4, b"\x00\x01q")
    relay.echo_from_app("100.100.83.1", "198.19.0.99", 5, 9, b"")
    udp, dns, echo = (flow_id for flow_id, _ in agent.opened)
    relay.unreachable_from_agent(udp, p.UNREACH_PORT, 0, "198.19.0.2")
    relay.unreachable_from_agent(dns, p.UNREACH_PORT, 0, "198.18.0.1")  # the app asked 100.100.83.53
    relay.unreachable_from_agent(echo, p.UNREACH_HOST, 9, "198.19.0.1")  # a router said so
    relay.unreachable_from_agent(12345, p.UNREACH_PORT, 0, None)
    assert icmp.sent == [
        ("unreachable", "198.19.0.2", APP, TARGET, p.UNREACH_PORT, False),
        ("unreachable", "100.100.83.53", APP2, TUNNEL_DNS4, p.UNREACH_PORT, False),
        ("unreachable", "198.19.0.1", ("100.100.83.1", 5), ("198.19.0.99", 9), p.UNREACH_HOST, True),
    ]
    assert relay.stats.unreachable_to_app == 3


def test_v1_agent_pings_are_prohibited(to_app, clock) -> None:
    icmp = FakeIcmp()
    relay, agent = make_relay(to_app, clock, icmp=icmp)
    agent.supports_icmp = False
    relay.echo_from_app("100.100.83.1", "198.19.0.2", 1, 1, b"")
    assert agent.opened == [] and icmp.sent[0][4] == p.UNREACH_PROHIBITED


def test_a_busy_flow_stays_alive_with_activity_refreshed_in_steps(to_app, clock) -> None:
    # Activity is recorded at most every RECENCY_STEP (not per datagram): a flow busy for longer than its
    # timeout never expires, and one that falls silent expires at most one step early, never late.
    relay, agent = make_relay(to_app, clock, UdpRelaySettings(idle_timeout=60.0))
    relay.datagram_from_app(APP, TARGET, b"first")
    relay.datagram_from_app(APP2, TARGET, b"other flow, then silent")
    busy, quiet = (flow_id for flow_id, _ in agent.opened)
    start = clock.now
    for tick in range(1, 1501):  # 150 s, a datagram each way every 0.1 s
        clock.now = start + tick * 0.1
        relay.datagram_from_app(APP, TARGET, b"up")
        relay.datagram_from_agent(busy, TARGET, b"down")
        relay.expire(clock.now)
    assert agent.closed == [quiet]
    last = clock.now
    deadline = relay.next_deadline()
    assert deadline is not None
    assert last + 60.0 - RECENCY_STEP <= deadline <= last + 60.0
    assert relay.expire(deadline - 0.01) == 0
    assert relay.expire(deadline) == 1
    assert agent.closed == [quiet, busy]
    assert len(to_app) == 1500
