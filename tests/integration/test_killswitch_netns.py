"""The kill switch in real network namespaces: what it lets out, what it blocks, and that undo is exact.

Each test builds its own namespaces `x2k-<tag>-c` (client), `x2k-<tag>-p` (peer) and `x2k-<tag>-k` (a
"container" behind the client). Two veth pairs join client and peer: `x2kc0` is the client's "physical" link
(v4 + v6 default routes through the peer), `x2ktun0` stands in for the TUN (a veth, so that traffic through
it really arrives somewhere). A third pair joins the container (`x2kk0`, 198.18.74.1, fd78:7474::1; default
routes via the client) to the client (`x2kb0`), which forwards for it (ip_forward=1 in its namespace only).
The peer listens on TCP 2222 (the "SSH server") and 8080 on every address, routes the container's subnet
back through the client, and counts (nft, in its own namespace) the container's packets per arriving link.
The kill switch code and nft run only inside the client namespace.
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
TUN = "x2ktun0"
PROBE_TIMEOUT = 3.0

# The user's own firewall table in the client namespace: it must come out of every test byte for byte.
USER_TABLE = """\
table inet userfw {
\tchain out {
\t\ttype filter hook output priority 10; policy accept;
\t\tip daddr 198.18.79.79 drop
\t}
}
"""

# Runs in the peer namespace: TCP 2222 and 8080 on every v4/v6 address, each answers "ok <port>".
LISTENER = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(64)
    def loop():
        while True:
            c, _ = s.accept()
            with c:
                c.sendall(f"ok {port}\n".encode())
    threading.Thread(target=loop, daemon=True).start()
for port in (2222, 8080):
    serve(port)
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""

# A TCP probe (optionally from a socket marked with SO_MARK): the peer's answer, or the error's name.
PROBE = r"""
import errno, socket

def probe(host, port, mark=None):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if mark is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.settimeout(TIMEOUT)
            s.connect((host, port))
            return s.recv(64).decode().strip() or "closed"
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
"""

# Runs in the client namespace: probe, apply the kill switch, probe (also marked and from the container),
# then undo or die.
SCENARIO = r"""
import errno, json, os, signal, socket, subprocess, sys, threading
from ipaddress import ip_network as N
from pathlib import Path
from x2ssh.host.linux.firewall import KillSwitch
from x2ssh.host.linux.routes import FWMARK
from x2ssh.host.journal import StateJournal, journal_path

mode, state_dir, tun, peer_ns, container_ns = sys.argv[1:6]
TIMEOUT = float(sys.argv[6])
PROBE = sys.argv[7]
exec(PROBE)  # probe(host, port, mark=None), shared with the container's probes

TARGETS = {
    "server v4": ("198.18.70.1", 2222), "server v6": ("fd78:7070::1", 2222),
    "other v4": ("198.18.72.1", 2222), "other v6": ("fd78:7272::1", 2222),
    "excluded v4": ("198.18.71.1", 8080), "excluded v6": ("fd78:7171::1", 8080),
    "tun": ("198.18.73.1", 8080),
}

def probes():
    report = {name: probe(*target) for name, target in TARGETS.items()}
    for name in ("server v4", "server v6", "other v4"):
        report["marked " + name] = probe(*TARGETS[name], mark=FWMARK)
    return report

def from_container():
    code = f"TIMEOUT = {TIMEOUT!r}\nTARGETS = {TARGETS!r}\n" + PROBE + (
        "import json\nprint(json.dumps({n: probe(h, p) for n, (h, p) in TARGETS.items()}))\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", container_ns, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )
    return json.loads(done.stdout)

def local_and_inbound():
    # a listener here: reached over loopback, and from the peer over the physical link (a reply to them)
    srv = socket.create_server(("0.0.0.0", 7000))
    def answer():
        for _ in range(2):
            c, _ = srv.accept()
            with c:
                c.sendall(b"hello\n")
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    loop = probe("127.0.0.1", 7000)
    client = (
        "import socket,sys\n"
        "try:\n"
        "    s = socket.create_connection(('198.18.70.2', 7000), timeout=float(sys.argv[1]))\n"
        "    s.settimeout(float(sys.argv[1])); print(s.recv(64).decode().strip())\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    inbound = subprocess.run(
        ["ip", "netns", "exec", peer_ns, sys.executable, "-c", client, str(TIMEOUT)],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    srv.close()
    return {"loopback": loop, "inbound": inbound}

def neighbours_forgotten():
    # both sides must solicit again: proves neighbour discovery still gets out
    for ns_args in ([], ["-n", peer_ns]):
        dev = "x2kp0" if ns_args else "x2kc0"
        subprocess.run(["ip", *ns_args, "-6", "neigh", "flush", "dev", dev], check=True, timeout=30)
    return probe("fd78:7070::1", 2222, mark=FWMARK)

journal = StateJournal(journal_path(Path(state_dir), tun))
report = {"before": probes(), "container before": from_container()}
ks = KillSwitch(tun, [N("198.18.71.0/24"), N("fd78:7171::/48")])
ks.apply(journal)
report["during"] = probes()
report["container during"] = from_container()
report.update(local_and_inbound())
report["v6 after neighbour flush"] = neighbours_forgotten()
print(json.dumps(report), flush=True)
if mode == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
undone = journal.undo_all()
print(json.dumps({"undone": undone, "after": probes(), "container after": from_container()}), flush=True)
"""

CLEANUP = r"""
import json, sys
from pathlib import Path
from x2ssh.host.cleanup import cleanup
print(json.dumps(cleanup(Path(sys.argv[1]))))
"""

ALL_OPEN = {
    "server v4": "ok 2222",
    "server v6": "ok 2222",
    "other v4": "ok 2222",
    "other v6": "ok 2222",
    "excluded v4": "ok 8080",
    "excluded v6": "ok 8080",
    "tun": "ok 8080",
}
ALL_OPEN_MARKED = {
    **ALL_OPEN,
    "marked server v4": "ok 2222",
    "marked server v6": "ok 2222",
    "marked other v4": "ok 2222",
}
# the client: the TUN, the excludes and its own marked sockets (to any address); not the server unmarked
PASSED_DURING = {
    "excluded v4",
    "excluded v6",
    "tun",
    "marked server v4",
    "marked server v6",
    "marked other v4",
}
# forwarded from the container: only out of the TUN, or to the excludes
CONTAINER_PASSED_DURING = {"excluded v4", "excluded v6", "tun"}


# Runs in the client namespace: policy routing (as x2ssh sets it up) without, then with the kill switch;
# where the container's forwarded traffic goes, by route lookup and by the peer's per-link counters.
POLICY_SCENARIO = r"""
import json, re, subprocess, sys
from ipaddress import ip_network as N
from pathlib import Path
from x2ssh.host.linux.firewall import KillSwitch
from x2ssh.host.linux.routes import FWMARK, LinuxRouting, plan_policy
from x2ssh.host.journal import StateJournal, journal_path

state_dir, tun, peer_ns, container_ns = sys.argv[1:5]
TIMEOUT = float(sys.argv[5])
PROBE = sys.argv[6]
exec(PROBE)
TARGETS = {"other v4": ("198.18.72.1", 2222), "server v4": ("198.18.70.1", 2222)}

def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30).stdout

def from_container(name):
    code = f"TIMEOUT = {TIMEOUT!r}\n" + PROBE + f"print(probe{TARGETS[name]!r})\n"
    done = subprocess.run(
        ["ip", "netns", "exec", container_ns, sys.executable, "-c", code], capture_output=True, text=True,
        timeout=60,
    )
    return done.stdout.strip()

SEEN = dict.fromkeys(("via tun", "via uplink"), 0)

def counted():
    # how many of the container's packets reached the peer over each link since the last call
    listed = ip("netns", "exec", peer_ns, "nft", "list", "table", "inet", "probe")
    found = {}
    for packets, where in re.findall(r'counter packets (\d+) bytes \d+ comment "(via \w+)"', listed):
        found[where], SEEN[where] = int(packets) - SEEN[where], int(packets)
    return found

journal = StateJournal(journal_path(Path(state_dir), tun))
report = {}
counted()
report["plain"] = {"other v4": from_container("other v4"), "links": counted()}
routing = LinuxRouting()
routing.apply_policy(plan_policy(tun, [N("198.18.71.0/24")]), journal)
report["gets"] = [
    ip("route", "get", "198.18.72.1", "from", "198.18.74.1", "iif", "x2kb0").split("\n")[0].strip(),
    ip("-6", "route", "get", "fd78:7272::1", "from", "fd78:7474::1", "iif", "x2kb0").split("\n")[0].strip(),
    ip("route", "get", "198.18.71.1", "from", "198.18.74.1", "iif", "x2kb0").split("\n")[0].strip(),
]
report["policy"] = {"other v4": from_container("other v4"), "links": counted()}
KillSwitch(tun, [N("198.18.71.0/24")]).apply(journal)
report["policy and kill switch"] = {
    "other v4": from_container("other v4"),
    "links": counted(),
    "server v4": from_container("server v4"),  # on the client's LAN: main's own route, not the TUN
    "client server v4": probe("198.18.70.1", 2222),
    "client marked server v4": probe("198.18.70.1", 2222, mark=FWMARK),
}
print(json.dumps(report), flush=True)
print(json.dumps({"undone": journal.undo_all()}), flush=True)
"""

# The peer's own counters of the container's packets, per arriving link (in the peer namespace only).
PEER_COUNTERS = """\
table inet probe {
\tchain pre {
\t\ttype filter hook prerouting priority -300; policy accept;
\t\tiifname "x2kt0" ip saddr 198.18.74.0/24 counter comment "via tun"
\t\tiifname "x2kp0" ip saddr 198.18.74.0/24 counter comment "via uplink"
\t}
}
"""


@dataclass
class Lab:
    client: str
    peer: str
    container: str
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

    def ruleset(self) -> str:
        return run("ip", "netns", "exec", self.client, "nft", "list", "ruleset").stdout

    def routing(self) -> list[str]:
        ns = ("ip", "-n", self.client)
        return [
            run(*ns, *family, *what).stdout
            for family in (["-4"], ["-6"])
            for what in (["rule", "show"], ["route", "show", "table", "all"])
        ]

    def scenario(self, mode: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        args = (mode, str(self.state_dir), TUN, self.peer, self.container, str(PROBE_TIMEOUT), PROBE)
        done = self.in_client(sys.executable, "-c", SCENARIO, *args)
        return done, json_reports(done.stdout)

    def policy_scenario(self) -> tuple[subprocess.CompletedProcess, list[dict]]:
        args = (str(self.state_dir), TUN, self.peer, self.container, str(PROBE_TIMEOUT), PROBE)
        done = self.in_client(sys.executable, "-c", POLICY_SCENARIO, *args)
        return done, json_reports(done.stdout)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    client, peer, container = f"x2k-{tag}-c", f"x2k-{tag}-p", f"x2k-{tag}-k"
    listener: subprocess.Popen[str] | None = None
    try:
        for ns in (client, peer, container):
            run("ip", "netns", "add", ns)
            # no duplicate address detection: link-local routes exist at once, before any snapshot
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        veth(client, peer, "x2kc0", "x2kp0", 70)  # the physical link
        veth(client, peer, TUN, "x2kt0", 73)  # the stand-in TUN
        veth(client, container, "x2kb0", "x2kk0", 74)  # the container: 198.18.74.1, fd78:7474::1
        for addr in ("198.18.71.1/32", "198.18.72.1/32", "fd78:7171::1/128", "fd78:7272::1/128"):
            run("ip", "-n", peer, "addr", "add", addr, "dev", "lo")
        run("ip", "-n", client, "route", "add", "default", "via", "198.18.70.1")
        run("ip", "-n", client, "-6", "route", "add", "default", "via", "fd78:7070::1")
        run("ip", "-n", container, "route", "add", "default", "via", "198.18.74.2")
        run("ip", "-n", container, "-6", "route", "add", "default", "via", "fd78:7474::2")
        run("ip", "-n", peer, "route", "add", "198.18.74.0/24", "via", "198.18.70.2")
        run("ip", "-n", peer, "-6", "route", "add", "fd78:7474::/64", "via", "fd78:7070::2")
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):  # the client's namespace only
            run("ip", "netns", "exec", client, "sysctl", "-qw", key)
        run("ip", "netns", "exec", client, "nft", "-f", "-", stdin=USER_TABLE)
        run("ip", "netns", "exec", peer, "nft", "-f", "-", stdin=PEER_COUNTERS)
        listener = subprocess.Popen(
            ["ip", "netns", "exec", peer, sys.executable, "-c", LISTENER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready, _, _ = select.select([listener.stdout], [], [], 20)
        assert ready and listener.stdout.readline().strip() == "ready", "the peer's listener did not start"
        yield Lab(client, peer, container, tmp_path / "state")
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        for ns in (client, peer, container):
            run("ip", "netns", "del", ns, check=False)


BLOCKED = ("EHOSTUNREACH", "EACCES")  # the reject's ICMP error: blocked ones fail fast, not by a timeout


def check_filtering(report: dict) -> None:
    assert report["before"] == ALL_OPEN_MARKED, "the lab itself is broken: not everything reachable before"
    assert report["container before"] == ALL_OPEN, "the lab itself is broken: the container is cut off"
    during = report["during"]
    assert {k for k, v in during.items() if v == ALL_OPEN_MARKED[k]} == PASSED_DURING, during
    assert all(v in BLOCKED for k, v in during.items() if k not in PASSED_DURING), during
    container = report["container during"]
    assert {k for k, v in container.items() if v == ALL_OPEN[k]} == CONTAINER_PASSED_DURING, container
    assert all(v in BLOCKED for k, v in container.items() if k not in CONTAINER_PASSED_DURING), container
    assert report["loopback"] == "hello"
    assert report["inbound"] == "hello", "replies to a connection opened to us must get out"
    assert report["v6 after neighbour flush"] == "ok 2222", "IPv6 neighbour discovery was blocked"


def test_kill_switch_filters_and_journal_undo_restores_ruleset(lab: Lab) -> None:
    before = lab.ruleset()
    assert "table inet userfw" in before
    done, reports = lab.scenario("undo")
    assert done.returncode == 0, done.stderr
    check_filtering(reports[0])
    assert reports[1]["undone"] == ["removed kill switch table inet x2ssh_killswitch"]
    assert reports[1]["after"] == ALL_OPEN_MARKED
    assert reports[1]["container after"] == ALL_OPEN
    assert lab.ruleset() == before
    assert list(lab.state_dir.iterdir()) == []


def test_crash_keeps_blocking_until_cleanup_restores_ruleset(lab: Lab) -> None:
    before = lab.ruleset()
    done, reports = lab.scenario("crash")
    assert done.returncode == -9, done.stderr
    check_filtering(reports[0])
    left = lab.ruleset()
    assert "table inet x2ssh_killswitch" in left  # nothing leaks after a crash either
    assert len(list(lab.state_dir.iterdir())) == 1

    cleaned = lab.in_client(sys.executable, "-c", CLEANUP, str(lab.state_dir))
    assert cleaned.returncode == 0, cleaned.stderr
    assert "removed kill switch table inet x2ssh_killswitch" in json.loads(cleaned.stdout)
    assert lab.ruleset() == before
    assert list(lab.state_dir.iterdir()) == []

    again = lab.in_client(sys.executable, "-c", CLEANUP, str(lab.state_dir))
    assert again.returncode == 0 and json.loads(again.stdout) == []


def test_forwarded_traffic_follows_the_policy_into_the_tun_and_the_kill_switch_keeps_it_there(
    lab: Lab,
) -> None:
    before, routing_before = lab.ruleset(), lab.routing()
    done, reports = lab.policy_scenario()
    assert done.returncode == 0, done.stderr
    report, after = reports
    # no policy: the container's connection leaves through the client's uplink
    assert report["plain"]["other v4"] == "ok 2222"
    assert report["plain"]["links"]["via tun"] == 0 and report["plain"]["links"]["via uplink"] > 0
    # policy routing: forwarded traffic is unmarked, so it is looked up in the tunnel table
    gets = [" ".join(line.split()[:7]) for line in report["gets"]]
    assert gets[0] == f"198.18.72.1 from 198.18.74.1 dev {TUN} table 30770"
    assert gets[1] == f"fd78:7272::1 from fd78:7474::1 dev {TUN} table 30770"
    assert gets[2] == "198.18.71.1 from 198.18.74.1 via 198.18.70.1 dev x2kc0"  # excluded
    assert report["policy"]["other v4"] == "ok 2222"
    assert report["policy"]["links"]["via tun"] > 0 and report["policy"]["links"]["via uplink"] == 0
    # with the kill switch too: through the TUN still works; the LAN (main's specific route) is closed to
    # the container and to the client's unmarked sockets, open to the marked SSH connection
    both = report["policy and kill switch"]
    assert both["other v4"] == "ok 2222" and both["links"]["via tun"] > 0
    assert both["server v4"] in BLOCKED
    assert both["client server v4"] in BLOCKED
    assert both["client marked server v4"] == "ok 2222"
    assert len(after["undone"]) == 9  # 6 rules, 2 routes, src_valid_mark, the kill switch table
    assert lab.ruleset() == before
    assert lab.routing() == routing_before
    assert list(lab.state_dir.iterdir()) == []
