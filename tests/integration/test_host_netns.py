"""TUN, routes and resolv.conf in a real network namespace: apply, undo, and recovery after SIGKILL.

Each test builds its own two namespaces (client + router, veth, v4 and v6 default routes) and deletes them
afterwards. The x2ssh code runs inside the client namespace under `ip netns exec`, as in production, so
plain IPRoute() and /etc/resolv.conf (the bind mount of /etc/netns/NAME/resolv.conf) are the namespace's.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.netns_kit import json_reports, run
from x2ssh.host.linux.tun import TUN_TX_QUEUE

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
TUN = "x2htun0"
RESOLV = b"# lab resolver\nnameserver 198.18.60.1\nsearch lab.test\n"

# Runs inside the client namespace: TUN + routes + DNS, report what the kernel shows, then undo or die.
SCENARIO = r"""
import json, os, signal, subprocess, sys
from ipaddress import ip_address, ip_network
from pathlib import Path
from x2ssh.host.linux.dns import DnsConfigurator
from x2ssh.host.linux.routes import LinuxRouting, plan_routes
from x2ssh.host.journal import StateJournal, journal_path
from x2ssh.host.api import DNS_V4
from x2ssh.host.linux.tun import open_tun

mode, state_dir, netns_resolv, tun_name = sys.argv[1:5]
here, bound = os.stat("/etc/resolv.conf"), os.stat(netns_resolv)
if (here.st_dev, here.st_ino) != (bound.st_dev, bound.st_ino):
    sys.exit("refusing: /etc/resolv.conf is not this namespace's own file")

def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30).stdout

journal = StateJournal(journal_path(Path(state_dir), tun_name))
tun = open_tun(tun_name, 16000, journal=journal)
routing = LinuxRouting()
servers = [ip_address("198.18.61.7"), ip_address("fd78:6161::7"), ip_address("198.18.60.1")]  # + a jump hop
excludes = [ip_network("198.18.200.0/24"), ip_network("198.18.201.0/24"), ip_network("fd78:6262::/48")]
plan = plan_routes(tun_name, servers, excludes, routing.lookup_original)
routing.apply(plan, journal)
dns = DnsConfigurator(tun_name)
dns.apply([DNS_V4], journal)
gets = ["198.18.61.7", "198.18.99.9", "198.18.201.5", "fd78:6161::7", "fd78:9999::1"]
print(json.dumps({
    "v4": ip("route"), "v6": ip("-6", "route"),
    "get": {dst: ip("route", "get", dst) for dst in gets},
    "resolv": open("/etc/resolv.conf").read(), "backend": dns.backend, "mtu": ip("link", "show", tun_name),
}), flush=True)
if mode == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
routing.undo(plan)
dns.restore()
tun.close()
print(json.dumps({"undone": journal.undo_all()}), flush=True)
"""

NAME_TAKEN = r"""
import sys
from x2ssh.errors import TunNameTaken
from x2ssh.host.preflight import check_tun_name_free
from x2ssh.host.linux.tun import open_tun
for check in (lambda: check_tun_name_free(sys.argv[1]), lambda: open_tun(sys.argv[1], 1500)):
    try:
        check()
    except TunNameTaken as e:
        print("TunNameTaken:", e)
"""


@dataclass
class Lab:
    client: str
    router: str
    resolv_conf: Path  # /etc/netns/<client>/resolv.conf
    state_dir: Path

    def in_client(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.client, *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def routes(self) -> tuple[list[str], list[str]]:
        v4 = run("ip", "-n", self.client, "route").stdout
        v6 = run("ip", "-n", self.client, "-6", "route").stdout
        return _lines(v4), _lines(v6)

    def python(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return self.in_client(sys.executable, "-c", script, *args)

    def scenario(self, mode: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        done = self.python(SCENARIO, mode, str(self.state_dir), str(self.resolv_conf), TUN)
        reports = json_reports(done.stdout)
        return done, reports


def _lines(text: str) -> list[str]:
    return sorted(line.strip() for line in text.splitlines() if line.strip())


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    client, router = f"x2h-{tag}-c", f"x2h-{tag}-r"
    etc = Path("/etc/netns") / client
    try:
        run("ip", "netns", "add", client)
        run("ip", "netns", "add", router)
        run(
            "ip",
            "-n",
            client,
            "link",
            "add",
            "x2hc0",
            "type",
            "veth",
            "peer",
            "name",
            "x2hr0",
            "netns",
            router,
        )
        for ns, dev, last in ((client, "x2hc0", 2), (router, "x2hr0", 1)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"198.18.60.{last}/24", "dev", dev)
            run("ip", "-n", ns, "-6", "addr", "add", f"fd78:6060::{last}/64", "dev", dev, "nodad")
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", client, "route", "add", "default", "via", "198.18.60.1")
        run("ip", "-n", client, "-6", "route", "add", "default", "via", "fd78:6060::1")
        # the user's own route, identical to one of our exclusions: it must survive untouched
        run("ip", "-n", client, "route", "add", "198.18.200.0/24", "via", "198.18.60.1", "dev", "x2hc0")
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_bytes(RESOLV)
        yield Lab(client, router, etc / "resolv.conf", tmp_path / "state")
    finally:
        run("ip", "netns", "del", client, check=False)
        run("ip", "netns", "del", router, check=False)
        shutil.rmtree(etc, ignore_errors=True)


EXPECTED_V4 = {
    "0.0.0.0/1 dev x2htun0 proto 88 scope link",
    "128.0.0.0/1 dev x2htun0 proto 88 scope link",
    "198.18.61.7 via 198.18.60.1 dev x2hc0 proto 88",
    "198.18.60.1 dev x2hc0 proto 88 scope link",
    "198.18.201.0/24 via 198.18.60.1 dev x2hc0 proto 88",
}
EXPECTED_V6 = {
    "::/1 dev x2htun0 proto 88 metric 1024 pref medium",
    "8000::/1 dev x2htun0 proto 88 metric 1024 pref medium",
    "fd78:6161::7 via fd78:6060::1 dev x2hc0 proto 88 metric 1024 pref medium",
    "fd78:6262::/48 via fd78:6060::1 dev x2hc0 proto 88 metric 1024 pref medium",
}


def check_applied(before: tuple[list[str], list[str]], report: dict) -> None:
    for family, expected, shown in (("v4", EXPECTED_V4, before[0]), ("v6", EXPECTED_V6, before[1])):
        during = _lines(report[family])
        assert set(shown) <= set(during), f"{family}: a route of the user's disappeared"
        added = set(during) - set(shown)
        assert expected <= added, f"{family}: missing {expected - added}"
        # anything else new is the kernel's own route for the TUN's subnets
        assert all(f"dev {TUN} proto kernel" in line for line in added - expected), added - expected
    gets = report["get"]
    assert "via 198.18.60.1 dev x2hc0" in gets["198.18.61.7"]  # the SSH server keeps its original path
    assert f"dev {TUN}" in gets["198.18.99.9"]
    assert "via 198.18.60.1 dev x2hc0" in gets["198.18.201.5"]  # excluded
    assert "via fd78:6060::1 dev x2hc0" in gets["fd78:6161::7"]
    assert f"dev {TUN}" in gets["fd78:9999::1"]
    assert report["backend"] == "resolv.conf"
    assert "nameserver 100.100.83.53\n" in report["resolv"] and "198.18.60.1" not in report["resolv"]
    assert "mtu 16000" in report["mtu"] and ",UP," in report["mtu"]
    assert f"qlen {TUN_TX_QUEUE}" in report["mtu"]  # room for bursts while the event loop is busy


def test_apply_and_undo_restore_routes_and_resolv_conf_exactly(lab: Lab) -> None:
    before = lab.routes()
    done, reports = lab.scenario("undo")
    assert done.returncode == 0, done.stderr
    check_applied(before, reports[0])
    assert reports[1]["undone"], "the journal had nothing left to undo"
    assert lab.routes() == before
    assert lab.resolv_conf.read_bytes() == RESOLV
    assert run("ip", "-n", lab.client, "link", "show", TUN, check=False).returncode != 0
    assert list(lab.state_dir.iterdir()) == []


def test_sigkill_then_vpn_cleanup_restores_everything(lab: Lab) -> None:
    before = lab.routes()
    done, reports = lab.scenario("crash")
    assert done.returncode == -9, done.stderr
    check_applied(before, reports[0])
    left_v4, _ = lab.routes()
    assert "198.18.61.7 via 198.18.60.1 dev x2hc0 proto 88" in left_v4  # the crash did leave routes behind
    assert lab.resolv_conf.read_bytes() != RESOLV
    assert run("ip", "-n", lab.client, "link", "show", TUN, check=False).returncode != 0  # died with us
    assert len(list(lab.state_dir.iterdir())) == 1

    cleanup = lab.in_client(sys.executable, "-m", "x2ssh", "--vpn-cleanup", "--state-dir", str(lab.state_dir))
    assert cleanup.returncode == 0, cleanup.stderr
    assert "removed route 198.18.61.7/32" in cleanup.stderr
    assert lab.routes() == before
    assert lab.resolv_conf.read_bytes() == RESOLV
    assert list(lab.state_dir.glob("*.journal")) == []  # the run lock's file stays (flock; never stale)

    again = lab.in_client(sys.executable, "-m", "x2ssh", "--vpn-cleanup", "--state-dir", str(lab.state_dir))
    assert again.returncode == 0 and "nothing to clean up" in again.stderr


def test_tun_name_taken_is_refused_and_left_alone(lab: Lab) -> None:
    run("ip", "-n", lab.client, "link", "add", TUN, "type", "veth", "peer", "name", "x2htunp")
    done = lab.python(NAME_TAKEN, TUN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("TunNameTaken:") == 2, done.stdout
    assert "veth" in run("ip", "-n", lab.client, "-d", "link", "show", TUN).stdout
