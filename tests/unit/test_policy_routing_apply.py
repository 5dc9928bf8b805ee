"""Policy routing's applier and journal undo functions, against a fake netlink socket (no root, no kernel).

The order is what matters here: each change is journaled before the netlink call that makes it, a change
that exists already is forgotten (never undone), and undo asks the kernel to delete exactly our own rule or
route (priority, table, protocol 88). The real kernel's behaviour is tested in
tests/integration/test_policy_routing_netns.py.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import ip_network as N
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from x2ssh.errors import RoutingError
from x2ssh.host.journal import StateJournal, default_undoers
from x2ssh.host.linux import routes
from x2ssh.host.linux.routes import (
    ROUTE_RECORD,
    RULE_RECORD,
    SYSCTL_RECORD,
    LinuxRouting,
    plan_policy,
    undo_route_record,
    undo_rule_record,
    undo_sysctl_record,
)


class FakeIPRoute:
    """Records netlink calls with how many journal entries existed at that moment; fails on request."""

    def __init__(self, journal: StateJournal | None = None, fail: dict | None = None) -> None:
        self.journal = journal
        self.calls: list[tuple] = []
        self.fail = fail or {}  # (kind, command, priority-or-dst) -> errno

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def link_lookup(self, ifname: str) -> list[int]:
        return [7] if ifname == "x2ssh0" else []

    def _call(self, kind: str, command: str, kwargs: dict, what: object) -> None:
        seen = len(self.journal.entries) if self.journal else None
        self.calls.append((kind, command, kwargs, seen))
        code = self.fail.get((kind, command, what))
        if code is not None:
            raise NetlinkError(code, "fake")

    def route(self, command: str, **kwargs):
        self._call("route", command, kwargs, kwargs["dst"])
        return []

    def rule(self, command: str, **kwargs):
        self._call("rule", command, kwargs, kwargs["priority"])
        return []


@pytest.fixture
def sysctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """src_valid_mark as a plain file holding "0"."""
    path = tmp_path / "src_valid_mark"
    path.write_text("0\n")
    monkeypatch.setattr(routes, "_SYSCTLS", {routes.SRC_VALID_MARK: str(path)})
    return path


def use(monkeypatch: pytest.MonkeyPatch, fake: FakeIPRoute) -> FakeIPRoute:
    monkeypatch.setattr(routes, "iproute", lambda: fake)
    return fake


V4_RULES = [
    {
        "family": socket.AF_INET,
        "priority": 6830,
        "table": 254,
        "protocol": 88,
        "dst": "198.18.100.0",
        "dst_len": 24,
    },
    {"family": socket.AF_INET, "priority": 6831, "table": 254, "protocol": 88, "suppress_prefixlen": 0},
    {
        "family": socket.AF_INET,
        "priority": 6832,
        "table": 0x7832,
        "protocol": 88,
        "fwmark": 0x7832,
        "fwmask": 0xFFFFFFFF,
        "flags": 2,
    },
]


def test_apply_policy_journals_each_change_before_making_it(tmp_path, monkeypatch, sysctl):
    journal = StateJournal(tmp_path / "j.journal")
    fake = use(monkeypatch, FakeIPRoute(journal))
    LinuxRouting().apply_policy(plan_policy("x2ssh0", [N("198.18.100.0/24")], families=(4,)), journal)
    assert sysctl.read_text() == "1\n"
    # entry 0 is the owner, 1 the sysctl; each netlink call comes right after its own record
    assert fake.calls == [
        (
            "route",
            "add",
            {
                "oif": 7,
                "dst": "0.0.0.0/0",
                "family": socket.AF_INET,
                "proto": 88,
                "table": 0x7832,
                "scope": 253,
            },
            3,
        ),
        ("rule", "add", V4_RULES[0], 4),
        ("rule", "add", V4_RULES[1], 5),
        ("rule", "add", V4_RULES[2], 6),
    ]
    records = [(e.kind, e.data) for e in reversed(journal.pending())]
    assert records[0] == (
        SYSCTL_RECORD,
        {"name": "net.ipv4.conf.all.src_valid_mark", "old": "0", "value": "1"},
    )
    assert records[1] == (
        ROUTE_RECORD,
        {
            "dst": "0.0.0.0/0",
            "gateway": None,
            "dev": "x2ssh0",
            "reason": "tunnel",
            "proto": 88,
            "table": 0x7832,
        },
    )
    assert records[2:] == [
        (RULE_RECORD, {"family": 4, "priority": 6830, "table": 254, "dst": "198.18.100.0/24", "fwmark": None,
                       "invert": False, "suppress_prefixlength": None, "reason": "exclude", "proto": 88}),
        (RULE_RECORD, {"family": 4, "priority": 6831, "table": 254, "dst": None, "fwmark": None,
                       "invert": False, "suppress_prefixlength": 0, "reason": "specific", "proto": 88}),
        (RULE_RECORD, {"family": 4, "priority": 6832, "table": 0x7832, "dst": None, "fwmark": 0x7832,
                       "invert": True, "suppress_prefixlength": None, "reason": "tunnel", "proto": 88}),
    ]  # fmt: skip


def test_apply_policy_ipv6_rules_and_route(tmp_path, monkeypatch, sysctl):
    journal = StateJournal(tmp_path / "j.journal")
    fake = use(monkeypatch, FakeIPRoute(journal))
    LinuxRouting().apply_policy(plan_policy("x2ssh0", [N("fd78:100::/48")], families=(6,)), journal)
    assert sysctl.read_text() == "0\n"  # an IPv4 setting: not touched for IPv6 alone
    assert [(k, c, a) for k, c, a, _ in fake.calls] == [
        ("route", "add", {"oif": 7, "dst": "::/0", "family": socket.AF_INET6, "proto": 88, "table": 0x7832}),
        ("rule", "add", {"family": socket.AF_INET6, "priority": 6830, "table": 254, "protocol": 88,
                         "dst": "fd78:100::", "dst_len": 48}),
        ("rule", "add", {**V4_RULES[1], "family": socket.AF_INET6}),
        ("rule", "add", {**V4_RULES[2], "family": socket.AF_INET6}),
    ]  # fmt: skip


def test_sysctl_already_set_is_neither_written_nor_journaled(tmp_path, monkeypatch, sysctl):
    sysctl.write_text("1\n")
    journal = StateJournal(tmp_path / "j.journal")
    use(monkeypatch, FakeIPRoute(journal))
    LinuxRouting().apply_policy(plan_policy("x2ssh0", [], families=(4,)), journal)
    assert SYSCTL_RECORD not in [e.kind for e in journal.pending()]


def test_existing_rule_is_forgotten_not_undone(tmp_path, monkeypatch, sysctl):
    journal = StateJournal(tmp_path / "j.journal")
    use(monkeypatch, FakeIPRoute(journal, fail={("rule", "add", 6831): errno.EEXIST}))
    LinuxRouting().apply_policy(plan_policy("x2ssh0", [], families=(4,)), journal)
    assert [e.data.get("priority") for e in journal.pending() if e.kind == RULE_RECORD] == [6832]


def test_failure_keeps_what_was_done_for_undo(tmp_path, monkeypatch, sysctl):
    journal = StateJournal(tmp_path / "j.journal")
    use(monkeypatch, FakeIPRoute(journal, fail={("rule", "add", 6832): errno.EPERM}))
    with pytest.raises(RoutingError, match=r"cannot add rule -4 6832: not fwmark 0x7832 lookup 30770"):
        LinuxRouting().apply_policy(plan_policy("x2ssh0", [], families=(4,)), journal)
    # the failed rule stays recorded too: undoing a change that never happened is harmless
    assert [e.kind for e in reversed(journal.pending())] == [
        SYSCTL_RECORD,
        ROUTE_RECORD,
        RULE_RECORD,
        RULE_RECORD,
    ]


def test_missing_tun_is_an_error_before_any_route(tmp_path, monkeypatch, sysctl):
    journal = StateJournal(tmp_path / "j.journal")
    fake = use(monkeypatch, FakeIPRoute(journal))
    with pytest.raises(RoutingError, match="no interface gone0"):
        LinuxRouting().apply_policy(plan_policy("gone0", [], families=(4,)), journal)
    assert fake.calls == []


def test_undo_rule_record_deletes_exactly_our_rule(monkeypatch):
    fake = use(monkeypatch, FakeIPRoute())
    data = {"family": 4, "priority": 6832, "table": 0x7832, "dst": None, "fwmark": 0x7832, "invert": True,
            "suppress_prefixlength": None, "reason": "tunnel", "proto": 88}  # fmt: skip
    assert undo_rule_record(data) == "removed rule -4 6832: not fwmark 0x7832 lookup 30770"
    assert fake.calls == [("rule", "del", V4_RULES[2], None)]
    fake.fail = {("rule", "del", 6832): errno.ENOENT}
    assert undo_rule_record(data) == "already gone: rule -4 6832: not fwmark 0x7832 lookup 30770"


def test_undo_rule_record_exclude_and_suppress(monkeypatch):
    fake = use(monkeypatch, FakeIPRoute())
    assert (
        undo_rule_record({"family": 6, "priority": 6830, "table": 254, "dst": "fd78:100::/48"})
        == "removed rule -6 6830: to fd78:100::/48 lookup main"
    )
    assert (
        undo_rule_record({"family": 4, "priority": 6831, "table": 254, "suppress_prefixlength": 0})
        == "removed rule -4 6831: lookup main suppress_prefixlength 0"
    )
    assert [c[2] for c in fake.calls] == [
        {
            "family": socket.AF_INET6,
            "priority": 6830,
            "table": 254,
            "protocol": 88,
            "dst": "fd78:100::",
            "dst_len": 48,
        },
        V4_RULES[1],
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"family": 4, "priority": 32766, "table": 254},  # the kernel's own `lookup main`
        {"family": 4, "priority": 6832, "table": 100},  # someone else's table
        {"family": 5, "priority": 6832, "table": 254},
        {"family": 4, "table": 254},
        {"family": 4, "priority": "x", "table": 254},
    ],
)
def test_undo_rule_record_refuses_what_is_not_ours(monkeypatch, data):
    fake = use(monkeypatch, FakeIPRoute())
    with pytest.raises(RoutingError):
        undo_rule_record(data)
    assert fake.calls == []


def test_undo_route_record_in_the_tunnel_table_and_old_records_in_main(monkeypatch):
    fake = use(monkeypatch, FakeIPRoute())
    assert (
        undo_route_record({"dst": "::/0", "gateway": None, "dev": "x2ssh0", "table": 0x7832})
        == "removed route ::/0 dev x2ssh0 table 30770"
    )
    assert undo_route_record({"dst": "0.0.0.0/1", "gateway": None, "dev": "x2ssh0"}).startswith("removed")
    assert [c[2] for c in fake.calls] == [
        {"dst": "::/0", "family": socket.AF_INET6, "proto": 88, "table": 0x7832},
        {"dst": "0.0.0.0/1", "family": socket.AF_INET, "proto": 88, "table": 254, "scope": 255},
    ]
    with pytest.raises(RoutingError, match="not x2ssh's"):
        undo_route_record({"dst": "::/0", "gateway": None, "dev": "x2ssh0", "table": 100})


def test_undo_sysctl_record_restores_the_old_value_exactly(sysctl):
    sysctl.write_text("1\n")
    data = {"name": "net.ipv4.conf.all.src_valid_mark", "old": "0", "value": "1"}
    assert undo_sysctl_record(data) == "restored net.ipv4.conf.all.src_valid_mark = 0 (was 1)"
    assert sysctl.read_text() == "0\n"
    assert undo_sysctl_record(data) == "already restored: net.ipv4.conf.all.src_valid_mark = 0"


@pytest.mark.parametrize(
    "data",
    [
        {"name": "net.ipv4.ip_forward", "old": "1"},
        {"name": "net.ipv4.conf.all.src_valid_mark", "old": "0\nx"},
        {"name": "net.ipv4.conf.all.src_valid_mark"},
    ],
)
def test_undo_sysctl_record_refuses_other_sysctls_and_values(sysctl, data):
    sysctl.write_text("1\n")
    with pytest.raises(RoutingError, match="not x2ssh's"):
        undo_sysctl_record(data)
    assert sysctl.read_text() == "1\n"


def test_policy_undo_functions_are_registered_with_the_journal():
    undoers = default_undoers()
    assert undoers[RULE_RECORD] is undo_rule_record
    assert undoers[SYSCTL_RECORD] is undo_sysctl_record
    assert undoers[ROUTE_RECORD] is undo_route_record


def test_whole_policy_journal_undoes_in_reverse(tmp_path, monkeypatch, sysctl):
    journal = StateJournal(tmp_path / "j.journal")
    fake = use(monkeypatch, FakeIPRoute(journal))
    LinuxRouting().apply_policy(plan_policy("x2ssh0", [], families=(4, 6)), journal)
    fake.calls.clear()
    fake.journal = None
    done = journal.undo_all()
    assert [(k, c, a.get("priority", a.get("dst"))) for k, c, a, _ in fake.calls] == [
        ("rule", "del", 6832),
        ("rule", "del", 6831),
        ("rule", "del", 6832),
        ("rule", "del", 6831),
        ("route", "del", "::/0"),
        ("route", "del", "0.0.0.0/0"),
    ]
    assert done[-1] == "restored net.ipv4.conf.all.src_valid_mark = 0 (was 1)"
    assert sysctl.read_text() == "0\n"
    assert not journal.path.exists()
