"""Policy routing in real network namespaces: marked traffic follows the main table through an uplink change,
unmarked traffic goes into the TUN, and the journal's undo leaves rules, routes and the sysctl byte-identical.

Each test builds its own namespaces `x2p-<tag>-c` (client) and `x2p-<tag>-p` (peer) joined by two veth pairs,
the client's two uplinks: A (`x2pa0`, 198.18.80.0/24, fd78:8080::/64; the default routes at first) and B
(`x2pb0`, 198.18.81.0/24, fd78:8181::/64). The peer holds the "SSH server" 198.18.85.1 / fd78:8585::1 and an
excluded host 198.18.86.5 / fd78:8686::5 on its loopback, reachable from the client only through a default
route; its TCP port 2222 answers with the address the connection came from, which tells the uplink used.
The TUN is a real one, made by x2ssh's own open_tun inside the client namespace, so that what the kernel
routes into it can be read back from its file descriptor.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.netns_kit import json_reports, run, veth

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TUN = "x2ptun0"
SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"

# Runs in the peer namespace: TCP 2222 on every address answers "from <client address>".
LISTENER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 2222))
s.listen(64)
def loop():
    while True:
        c, peer = s.accept()
        with c:
            c.sendall(f"from {peer[0].removeprefix('::ffff:')}\n".encode())
threading.Thread(target=loop, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""

# Runs in the client namespace: TUN, policy routing, probes; optionally roam to uplink B; then undo or die.
SCENARIO = r"""
import json, os, select, signal, socket, subprocess, sys, time
from ipaddress import ip_network
from pathlib import Path
from x2ssh.host.journal import StateJournal, journal_path
from x2ssh.host.linux.firewall import KillSwitch, MarkRestore
from x2ssh.host.linux.routes import FWMARK, LinuxRouting, plan_policy
from x2ssh.host.linux.tun import open_tun

mode, state_dir, tun_name, restore, kill_switch = sys.argv[1:6]
TIMEOUT = 3.0

def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30).stdout

def tables():
    return ip("-4", "route", "show", "table", "all") + ip("-6", "route", "show", "table", "all")

def rules():
    return ip("rule", "show") + ip("-6", "rule", "show")

def marked_tcp(host):
    # what x2ssh's helper hands out: a socket with SO_MARK = FWMARK; the peer tells where we came from
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, FWMARK)
        s.settimeout(TIMEOUT)
        try:
            s.connect((host, 2222))
            return s.recv(128).decode().strip()
        except OSError as e:
            return type(e).__name__

def unmarked_udp_into_tun(tun, host):
    # an ordinary socket: its datagram must come out of the TUN's file descriptor
    while select.select([tun.fd], [], [], 0)[0]:
        os.read(tun.fd, 65536)
    probe = f"probe {host} {time.monotonic_ns()}".encode()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(probe, (host, 9))
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if select.select([tun.fd], [], [], left)[0] and os.read(tun.fd, 65536).endswith(probe):
            return True
    return False

def gets(families):
    out = {}
    for dst in ("198.18.85.1", "198.18.86.5", "198.18.80.1", "fd78:8585::1", "fd78:8686::5"):
        if (6 if ":" in dst else 4) not in families:
            continue
        family = ["-6"] if ":" in dst else []
        out[dst] = ip(*family, "route", "get", dst).split("\n")[0].strip()
        out[dst + " marked"] = ip(*family, "route", "get", dst, "mark", hex(FWMARK)).split("\n")[0].strip()
    return out

def probes(tun, families):
    servers = [h for h, f in (("198.18.85.1", 4), ("fd78:8585::1", 6)) if f in families]
    report = {f"marked {h}": marked_tcp(h) for h in servers}
    report.update({f"unmarked {h} in tun": unmarked_udp_into_tun(tun, h) for h in servers})
    return report

journal = StateJournal(journal_path(Path(state_dir), tun_name))
tun = open_tun(tun_name, 1500, journal=journal)
routing = LinuxRouting()
families = routing.policy_families(tun_name)
plan = plan_policy(tun_name, [ip_network("198.18.86.0/24"), ip_network("fd78:8686::/48")], families)
routing.apply_policy(plan, journal)
restored = MarkRestore().apply(journal) if restore == "yes" else None
if kill_switch == "yes":
    KillSwitch(tun_name, [ip_network("198.18.86.0/24"), ip_network("fd78:8686::/48")]).apply(journal)
report = {
    "mark restore": restored,
    "nft tables": subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout,
    "families": list(families), "supported": routing.policy_supported(), "rules": rules(),
    "sysctl": open("/proc/sys/net/ipv4/conf/all/src_valid_mark").read(),
    "up": probes(tun, families), "up gets": gets(families),
}
if mode == "roam":
    # the laptop moves from uplink A to uplink B; nobody tells x2ssh, nothing of ours changes
    ip("route", "del", "default", "via", "198.18.80.1")
    ip("-6", "route", "del", "default", "via", "fd78:8080::1")
    ip("link", "set", "x2pa0", "down")
    ip("route", "add", "default", "via", "198.18.81.1")
    ip("-6", "route", "add", "default", "via", "fd78:8181::1")
    report.update({"roamed": probes(tun, families), "roamed gets": gets(families), "roamed rules": rules()})
report["tables"] = tables()
print(json.dumps(report), flush=True)
if mode == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
undone = journal.undo_all()
print(json.dumps({"undone": undone, "tables": tables(), "rules": rules()}), flush=True)
tun.close()
"""

CLEANUP = r"""
import json, sys
from pathlib import Path
from x2ssh.host.cleanup import cleanup
print(json.dumps(cleanup(Path(sys.argv[1]))))
"""


@dataclass
class Lab:
    client: str
    peer: str
    state_dir: Path

    def in_client(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.client, *argv],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def snapshot(self) -> dict[str, str]:
        """Everything policy routing may touch, as the kernel prints it."""
        ns = ("ip", "-n", self.client)
        return {
            "rules v4": run(*ns, "rule", "show").stdout,
            "rules v6": run(*ns, "-6", "rule", "show").stdout,
            "routes v4": run(*ns, "-4", "route", "show", "table", "all").stdout,
            "routes v6": run(*ns, "-6", "route", "show", "table", "all").stdout,
            "src_valid_mark": run("ip", "netns", "exec", self.client, "cat", SRC_VALID_MARK).stdout,
            "nft": run("ip", "netns", "exec", self.client, "nft", "list", "ruleset").stdout,
        }

    def scenario(
        self, mode: str, restore: bool = True, kill_switch: bool = False
    ) -> tuple[subprocess.CompletedProcess, list[dict]]:
        flags = ["yes" if restore else "no", "yes" if kill_switch else "no"]
        done = self.in_client(sys.executable, "-c", SCENARIO, mode, str(self.state_dir), TUN, *flags)
        return done, json_reports(done.stdout)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    client, peer = f"x2p-{tag}-c", f"x2p-{tag}-p"
    listener: subprocess.Popen[str] | None = None
    try:
        run("ip", "netns", "add", client)
        run("ip", "netns", "add", peer)
        for ns in (client, peer):
            # no duplicate address detection: link-local addresses (and their routes) exist at once, so
            # that the "before" snapshot is not taken while they still appear
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        veth(client, peer, "x2pa0", "x2pa1", 80)  # uplink A
        veth(client, peer, "x2pb0", "x2pb1", 81)  # uplink B
        for addr in ("198.18.85.1/32", "198.18.86.5/32", "fd78:8585::1/128", "fd78:8686::5/128"):
            run("ip", "-n", peer, "addr", "add", addr, "dev", "lo")
        run("ip", "-n", client, "route", "add", "default", "via", "198.18.80.1")
        run("ip", "-n", client, "-6", "route", "add", "default", "via", "fd78:8080::1")
        # the user's own rules and table at our neighbours' priorities: they must come out untouched
        run("ip", "-n", client, "rule", "add", "priority", "6832", "from", "198.18.222.0/24", "lookup", "100")
        run(
            "ip",
            "-n",
            client,
            "-6",
            "rule",
            "add",
            "priority",
            "6831",
            "from",
            "fd78:222::/48",
            "lookup",
            "100",
        )
        run("ip", "-n", client, "route", "add", "198.18.223.0/24", "via", "198.18.81.1", "table", "100")
        # loose reverse-path filtering, as systemd sets it on most desktops
        run("ip", "netns", "exec", client, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
        listener = subprocess.Popen(
            ["ip", "netns", "exec", peer, sys.executable, "-c", LISTENER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([listener.stdout], [], [], 20)
        assert ready and listener.stdout.readline().strip() == "ready", "the peer's listener did not start"
        yield Lab(client, peer, tmp_path / "state")
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        run("ip", "netns", "del", client, check=False)
        run("ip", "netns", "del", peer, check=False)


OUR_RULES_V4 = [
    "6830:\tfrom all to 198.18.86.0/24 lookup main proto 88",
    "6831:\tfrom all lookup main suppress_prefixlength 0 proto 88",
    "6832:\tnot from all fwmark 0x7832 lookup 30770 proto 88",
]
OUR_RULES_V6 = [
    "6830:\tfrom all to fd78:8686::/48 lookup main proto 88",
    "6831:\tfrom all lookup main suppress_prefixlength 0 proto 88",
    "6832:\tnot from all fwmark 0x7832 lookup 30770 proto 88",
]


def check_up(report: dict, uplink: str, families: tuple[int, ...] = (4, 6)) -> None:
    """Marked traffic went out through `uplink` ("a" or "b"), unmarked came out of the TUN."""
    net4, net6 = {"a": ("198.18.80", "fd78:8080"), "b": ("198.18.81", "fd78:8181")}[uplink]
    expected = {}
    if 4 in families:
        expected |= {"marked 198.18.85.1": f"from {net4}.2", "unmarked 198.18.85.1 in tun": True}
    if 6 in families:
        expected |= {"marked fd78:8585::1": f"from {net6}::2", "unmarked fd78:8585::1 in tun": True}
    assert report == expected


def check_gets(gets: dict, uplink: str) -> None:
    net4, net6 = {"a": ("198.18.80", "fd78:8080"), "b": ("198.18.81", "fd78:8181")}[uplink]
    dev = f"x2p{uplink}0"
    assert gets["198.18.85.1 marked"].startswith(f"198.18.85.1 via {net4}.1 dev {dev} ")
    assert gets["198.18.85.1"].startswith(f"198.18.85.1 dev {TUN} table 30770 ")
    assert gets["198.18.86.5"].startswith(f"198.18.86.5 via {net4}.1 dev {dev} ")  # excluded
    assert gets["198.18.80.1"].startswith("198.18.80.1 dev x2pa0 ") or uplink == "b"  # LAN: main's own route
    assert gets["fd78:8585::1 marked"].startswith(f"fd78:8585::1 from :: via {net6}::1 dev {dev} ")
    assert gets["fd78:8585::1"].startswith(f"fd78:8585::1 from :: dev {TUN} table 30770 ")
    assert gets["fd78:8686::5"].startswith(f"fd78:8686::5 from :: via {net6}::1 dev {dev} ")


@pytest.mark.parametrize("kill_switch", [False, True], ids=["policy", "policy and kill switch"])
def test_marked_traffic_follows_the_main_table_through_an_uplink_change(lab: Lab, kill_switch: bool) -> None:
    before = lab.snapshot()
    done, reports = lab.scenario("roam", kill_switch=kill_switch)
    assert done.returncode == 0, done.stderr
    up, after = reports
    assert up["families"] == [4, 6] and up["supported"] is True
    assert up["sysctl"] == "1\n" and up["mark restore"] is True
    rules = up["rules"].splitlines()
    assert [r for r in rules if "proto 88" in r] == OUR_RULES_V4 + OUR_RULES_V6
    check_up(up["up"], "a")
    check_gets(up["up gets"], "a")
    # after the roam: the same rules, no route of ours changed, marked traffic now leaves through uplink B
    assert up["roamed rules"] == up["rules"]
    check_up(up["roamed"], "b")
    check_gets(up["roamed gets"], "b")
    # undo removed exactly our table-30770 routes and our rules, nothing of the roamed main table
    ours = [line for line in up["tables"].splitlines() if "table 30770" in line]
    assert ours == [
        f"default dev {TUN} table 30770 proto 88 scope link ",
        f"default dev {TUN} table 30770 proto 88 metric 1024 pref medium",
    ]
    # (the journal's last undo deletes the TUN itself, and with it the kernel's routes for its addresses)
    assert after["tables"].splitlines() == [
        line for line in up["tables"].splitlines() if f"dev {TUN}" not in line
    ]
    assert after["rules"] == before["rules v4"] + before["rules v6"]
    expected_tables = "table inet x2ssh_mark\n" + ("table inet x2ssh_killswitch\n" if kill_switch else "")
    assert up["nft tables"] == expected_tables
    final = lab.snapshot()
    assert final["src_valid_mark"] == before["src_valid_mark"] == "0\n"
    assert final["nft"] == before["nft"]
    assert list(lab.state_dir.iterdir()) == []


def test_apply_then_undo_leaves_rules_routes_and_sysctl_byte_identical(lab: Lab) -> None:
    before = lab.snapshot()
    done, reports = lab.scenario("undo")
    assert done.returncode == 0, done.stderr
    up, after = reports
    check_up(up["up"], "a")
    assert after["undone"] == [
        "removed mark-restoring table inet x2ssh_mark",
        "removed rule -6 6832: not fwmark 0x7832 lookup 30770",
        "removed rule -6 6831: lookup main suppress_prefixlength 0",
        "removed rule -6 6830: to fd78:8686::/48 lookup main",
        "removed rule -4 6832: not fwmark 0x7832 lookup 30770",
        "removed rule -4 6831: lookup main suppress_prefixlength 0",
        "removed rule -4 6830: to 198.18.86.0/24 lookup main",
        f"removed route ::/0 dev {TUN} table 30770",
        f"removed route 0.0.0.0/0 dev {TUN} table 30770",
        "restored net.ipv4.conf.all.src_valid_mark = 0 (was 1)",
        f"removed TUN {TUN}",
    ]
    assert lab.snapshot() == before
    assert list(lab.state_dir.iterdir()) == []


def test_sigkill_then_cleanup_removes_our_rules_and_restores_the_sysctl(lab: Lab) -> None:
    before = lab.snapshot()
    done, reports = lab.scenario("crash")
    assert done.returncode == -9, done.stderr
    check_up(reports[0]["up"], "a")
    left = lab.snapshot()
    assert all(rule in left["rules v4"] for rule in OUR_RULES_V4)  # the crash left our rules behind
    assert "table 30770" not in left["routes v4"]  # our routes died with the TUN
    assert left["src_valid_mark"] == "1\n"

    cleaned = lab.in_client(sys.executable, "-c", CLEANUP, str(lab.state_dir))
    assert cleaned.returncode == 0, cleaned.stderr
    undone = json.loads(cleaned.stdout)
    assert "removed rule -4 6832: not fwmark 0x7832 lookup 30770" in undone
    assert "already gone: route 0.0.0.0/0 dev x2ptun0 table 30770" in undone
    assert "restored net.ipv4.conf.all.src_valid_mark = 0 (was 1)" in undone
    assert lab.snapshot() == before
    assert list(lab.state_dir.iterdir()) == []


def test_without_ipv6_only_ipv4_is_planned_and_ipv6_rules_stay_untouched(lab: Lab) -> None:
    for key in ("all", "default"):
        run("ip", "netns", "exec", lab.client, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
    before = lab.snapshot()
    done, reports = lab.scenario("undo")
    assert done.returncode == 0, done.stderr
    up, _ = reports
    assert up["families"] == [4] and up["supported"] is True
    assert [r for r in up["rules"].splitlines() if "proto 88" in r] == OUR_RULES_V4
    check_up(up["up"], "a", families=(4,))
    assert lab.snapshot() == before


@pytest.mark.parametrize("restore", [True, False], ids=["mark restored", "no mark restore"])
def test_strict_reverse_path_filter_needs_the_mark_on_replies(lab: Lab, restore: bool) -> None:
    run("ip", "netns", "exec", lab.client, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    before = lab.snapshot()
    done, reports = lab.scenario("undo", restore=restore)
    assert done.returncode == 0, done.stderr
    up = reports[0]["up"]
    # the replies arrive unmarked on the uplink; src_valid_mark=1 and the restored mark make the reverse-path
    # lookup use main, else strict rp_filter looks them up in the tunnel table and drops them
    assert up["marked 198.18.85.1"] == ("from 198.18.80.2" if restore else "TimeoutError")
    assert up["marked fd78:8585::1"] == "from fd78:8080::2"  # IPv6 has no rp_filter
    assert lab.snapshot() == before
