"""The kill switch in real network namespaces: what it lets out, what it blocks, and that undo is exact.

Each test builds its own namespaces `x2k-<tag>-c` (client) and `x2k-<tag>-p` (peer) with two veth pairs:
`x2kc0` is the client's "physical" link (v4 + v6 default routes through the peer), `x2ktun0` stands in for
the TUN (a veth, so that traffic through it really arrives somewhere). The peer listens on TCP 2222 (the
"SSH server") and 8080 on every address. The kill switch code and nft run only inside the client namespace.
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

# Runs in the client namespace: probe, apply the kill switch, probe, update, probe, then undo or die.
SCENARIO = r"""
import errno, json, os, signal, socket, subprocess, sys, threading
from ipaddress import ip_address as A, ip_network as N
from pathlib import Path
from x2ssh.host.linux.firewall import KillSwitch
from x2ssh.host.journal import StateJournal, journal_path

mode, state_dir, tun, peer_ns = sys.argv[1:5]
timeout = float(sys.argv[5])

def probe(host, port):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).decode().strip() or "closed"
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__

TARGETS = {
    "server v4": ("198.18.70.1", 2222), "server v6": ("fd78:7070::1", 2222),
    "server v4 other port": ("198.18.70.1", 8080), "server v6 other port": ("fd78:7070::1", 8080),
    "other v4": ("198.18.72.1", 2222), "other v6": ("fd78:7272::1", 2222),
    "excluded v4": ("198.18.71.1", 8080), "excluded v6": ("fd78:7171::1", 8080),
    "tun": ("198.18.73.1", 8080),
}

def probes():
    return {name: probe(*target) for name, target in TARGETS.items()}

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
        ["ip", "netns", "exec", peer_ns, sys.executable, "-c", client, str(timeout)],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    srv.close()
    return {"loopback": loop, "inbound": inbound}

def neighbours_forgotten():
    # both sides must solicit again: proves neighbour discovery still gets out
    for ns_args in ([], ["-n", peer_ns]):
        dev = "x2kp0" if ns_args else "x2kc0"
        subprocess.run(["ip", *ns_args, "-6", "neigh", "flush", "dev", dev], check=True, timeout=30)
    return probe("fd78:7070::1", 2222)

journal = StateJournal(journal_path(Path(state_dir), tun))
report = {"before": probes()}
bypass = [(A("198.18.70.1"), 2222), (A("fd78:7070::1"), 2222)]
ks = KillSwitch(tun, bypass, [N("198.18.71.0/24"), N("fd78:7171::/48")])
ks.apply(journal)
report["during"] = probes()
report.update(local_and_inbound())
report["v6 after neighbour flush"] = neighbours_forgotten()
ks.update([(A("198.18.70.1"), 8080)])
report["updated"] = probes()
print(json.dumps(report), flush=True)
if mode == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
undone = journal.undo_all()
print(json.dumps({"undone": undone, "after": probes()}), flush=True)
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
    "server v4 other port": "ok 8080",
    "server v6 other port": "ok 8080",
    "other v4": "ok 2222",
    "other v6": "ok 2222",
    "excluded v4": "ok 8080",
    "excluded v6": "ok 8080",
    "tun": "ok 8080",
}
PASSED_DURING = {"server v4", "server v6", "excluded v4", "excluded v6", "tun"}
PASSED_UPDATED = {"server v4 other port", "excluded v4", "excluded v6", "tun"}


def run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, input=stdin)


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

    def ruleset(self) -> str:
        return run("ip", "netns", "exec", self.client, "nft", "list", "ruleset").stdout

    def scenario(self, mode: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        done = self.in_client(
            sys.executable, "-c", SCENARIO, mode, str(self.state_dir), TUN, self.peer, str(PROBE_TIMEOUT)
        )
        return done, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _veth(client: str, peer: str, client_dev: str, peer_dev: str, net: int) -> None:
    run(
        "ip", "-n", client, "link", "add", client_dev, "type", "veth", "peer", "name", peer_dev, "netns", peer
    )
    for ns, dev, last in ((client, client_dev, 2), (peer, peer_dev, 1)):
        run("ip", "-n", ns, "addr", "add", f"198.18.{net}.{last}/24", "dev", dev)
        run("ip", "-n", ns, "-6", "addr", "add", f"fd78:{net}{net}::{last}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    client, peer = f"x2k-{tag}-c", f"x2k-{tag}-p"
    listener: subprocess.Popen[str] | None = None
    try:
        run("ip", "netns", "add", client)
        run("ip", "netns", "add", peer)
        for ns in (client, peer):
            run("ip", "-n", ns, "link", "set", "lo", "up")
        _veth(client, peer, "x2kc0", "x2kp0", 70)  # the physical link
        _veth(client, peer, TUN, "x2kt0", 73)  # the stand-in TUN
        for addr in ("198.18.71.1/32", "198.18.72.1/32", "fd78:7171::1/128", "fd78:7272::1/128"):
            run("ip", "-n", peer, "addr", "add", addr, "dev", "lo")
        run("ip", "-n", client, "route", "add", "default", "via", "198.18.70.1")
        run("ip", "-n", client, "-6", "route", "add", "default", "via", "fd78:7070::1")
        run("ip", "netns", "exec", client, "nft", "-f", "-", stdin=USER_TABLE)
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


def check_filtering(report: dict) -> None:
    assert report["before"] == ALL_OPEN, "the lab itself is broken: not everything reachable before"
    during = report["during"]
    assert {k for k, v in during.items() if v == ALL_OPEN[k]} == PASSED_DURING, during
    # blocked ones fail fast with the reject's ICMP error, not by hanging until the timeout
    assert all(v in ("EHOSTUNREACH", "EACCES") for k, v in during.items() if k not in PASSED_DURING), during
    assert report["loopback"] == "hello"
    assert report["inbound"] == "hello", "replies to a connection opened to us must get out"
    assert report["v6 after neighbour flush"] == "ok 2222", "IPv6 neighbour discovery was blocked"
    updated = report["updated"]
    assert {k for k, v in updated.items() if v == ALL_OPEN[k]} == PASSED_UPDATED, updated


def test_kill_switch_filters_and_journal_undo_restores_ruleset(lab: Lab) -> None:
    before = lab.ruleset()
    assert "table inet userfw" in before
    done, reports = lab.scenario("undo")
    assert done.returncode == 0, done.stderr
    check_filtering(reports[0])
    assert reports[1]["undone"] == ["removed kill switch table inet x2ssh_killswitch"]
    assert reports[1]["after"] == ALL_OPEN
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
