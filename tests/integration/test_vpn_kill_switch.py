"""`x2ssh --vpn --vpn-kill-switch` end to end (issue 6): while x2ssh runs, and while it reconnects, a host
on the client's own link that is not the SSH port cannot be reached; on exit the ruleset is as before."""

from __future__ import annotations

import sys

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from tests.integration.vpn_runner import VpnLauncher, curl, kill_connection, wait_until

pytestmark = pytest.mark.netns

SIDE_PORT = 8081
# Runs in the client namespace: what happens to a TCP connection to (host, port), by errno name.
PROBE = r"""
import errno, socket, sys
s = socket.socket(); s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)) if e.errno else "timeout")
"""


def probe(lab: Lab, host: str, port: int) -> str:
    return lab.run(lab.client, [sys.executable, "-c", PROBE, host, str(port)], timeout=30).stdout.strip()


def ruleset(lab: Lab) -> str:
    return lab.run(lab.client, ["nft", "list", "ruleset"], timeout=30).stdout


def test_kill_switch_blocks_the_link_also_while_reconnecting(
    lab: Lab, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    server_addr = lab.server_client_side.v4
    side = lab.popen(lab.server, [sys.executable, "-m", "http.server", "--bind", server_addr, str(SIDE_PORT)])
    assert wait_until(lambda: probe(lab, server_addr, SIDE_PORT) == "connected", 15), "side service not up"
    before = ruleset(lab)
    server = lab.sshd(port=0)
    vpn = vpn_launcher.start(
        server, "--vpn-kill-switch", "--vpn-dns", "off", "--keepalive-interval", "1",
        "--keepalive-count-max", "2", "--retry-initial", "0.5", "--retry-max-delay", "1",
    )  # fmt: skip
    try:
        url = lab_services.http.url(lab.target_addr.v4, "1k.bin")
        assert curl(lab, url, "--fail", "--output", "/dev/null").returncode == 0, vpn.describe()
        blocked = probe(lab, server_addr, SIDE_PORT)
        assert blocked in ("EHOSTUNREACH", "EACCES", "EPERM", "timeout"), blocked
        # Cut the SSH connection and keep sshd refusing: x2ssh stays in "reconnecting".
        refuse = "add table ip cut\nadd chain ip cut in { type filter hook input priority 0; }\n"
        refuse += f"add rule ip cut in tcp dport {server.port} reject with tcp reset\n"
        lab.run(lab.server, ["nft", "-f", "-"], input=refuse, check=True)
        kill_connection(server)
        assert wait_until(lambda: "reconnect attempt" in vpn.output, 20), vpn.describe()
        still = probe(lab, server_addr, SIDE_PORT)
        assert still in ("EHOSTUNREACH", "EACCES", "EPERM", "timeout"), f"leaked while reconnecting: {still}"
        lab.run(lab.server, ["nft", "delete", "table", "ip", "cut"], check=True)
        assert wait_until(lambda: "reconnected" in vpn.output, 30), vpn.describe()
        assert curl(lab, url, "--fail", "--output", "/dev/null").returncode == 0, vpn.describe()
    finally:
        lab.run(lab.server, ["nft", "delete", "table", "ip", "cut"])
        vpn.interrupt()
        vpn.wait()
    try:
        assert ruleset(lab) == before, "the kill switch must be removed exactly"
        assert probe(lab, server_addr, SIDE_PORT) == "connected", "the link must work again after exit"
    finally:
        lab.kill(side)
