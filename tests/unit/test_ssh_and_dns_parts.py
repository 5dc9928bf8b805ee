"""Orchestration pieces that need no network: SSH option mapping, resolv.conf parsing, status rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from x2ssh.settings import parse_args
from x2ssh.ssh.connect import PREFERRED_CIPHERS, connect_options, parse_hop
from x2ssh.ssh.resolve_outside import nameservers
from x2ssh.status import Snapshot, StatusView, human_bytes


def test_connect_options_follow_the_command_line():
    s = parse_args(
        [
            "--vpn", "-p", "2222", "-l", "alice", "-i", "/k1", "-i", "/k2", "-F", "/cfg",
            "-J", "j1,bob@j2:2200", "-o", "UserKnownHostsFile=/kh", "-o", "ConnectTimeout=7", "host.example",
        ]
    )  # fmt: skip
    opts = connect_options(s)
    assert opts["port"] == 2222 and opts["username"] == "alice"
    assert opts["client_keys"] == ["/k1", "/k2"]
    assert opts["config"] == [str(Path("/cfg"))]
    assert "tunnel" not in opts  # hops are connected one by one with these same options
    assert opts["known_hosts"] == ["/kh"]
    assert opts["connect_timeout"] == 7.0
    assert opts["encryption_algs"][0] == PREFERRED_CIPHERS[0]


def test_host_keys_are_checked_unless_the_user_says_no():
    checked = connect_options(parse_args(["--vpn", "h"]))
    assert "known_hosts" not in checked  # asyncssh's default: ~/.ssh/known_hosts, verified
    unchecked = connect_options(parse_args(["--vpn", "-o", "StrictHostKeyChecking=no", "h"]))
    assert unchecked["known_hosts"] is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("nameserver 198.18.0.53\nnameserver 198.18.0.54\n", "198.18.0.53"),
        ("# comment\nsearch lab\n  nameserver   fd58::53  # trailing\n", "fd58::53"),
        ("nameserver fe80::1%eth0\n", "fe80::1"),
        ("nameserver not-an-address\nnameserver 127.0.0.53\n", "127.0.0.53"),
        ("search only\n", None),
        ("", None),
    ],
)
def test_first_nameserver(text, expected):
    assert next(iter(nameservers(text)), None) == expected


def test_status_line_reports_counts_and_rates():
    view = StatusView(live=False)
    view.update(Snapshot(state="up", tcp_active=3, tcp_opened=10, tcp_refused=2, bytes_up=0, bytes_down=0))
    line = view.line(Snapshot(state="up", tcp_active=3, tcp_opened=10, tcp_refused=2, bytes_down=3 * 1024**2))
    assert "up, ssh 1 conn, tcp 3 open (10 total, 2 refused)" in line
    assert "down 3.0 MiB" in line


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024**4) == "5.0 TiB"


@pytest.mark.parametrize(
    "hop,expected",
    [
        ("jump", (None, "jump", None)),
        ("bob@jump:2200", ("bob", "jump", 2200)),
        ("bob@[fd58::1]:2222", ("bob", "fd58::1", 2222)),
        ("[fd58::1]", (None, "fd58::1", None)),
        ("fd58::1", (None, "fd58::1", None)),
    ],
)
def test_parse_hop(hop, expected):
    assert parse_hop(hop) == expected
