"""The SSH server changes address while the tunnel is down: x2ssh resolves its name again outside the
tunnel (the machine's original resolver, through the physical interface), pins the new address outside the
tunnel and reconnects there (issue 6). Real sshd and dnsmasq in the namespace lab."""

from __future__ import annotations

import subprocess
import time

import pytest

from benchmarks.lab import Lab
from benchmarks.services import DNS_PORT, TargetServices, _dnsmasq_argv, wait_tcp_port
from tests.integration.vpn_runner import (
    NetSnapshot,
    VpnProcess,
    curl,
    kill_connection,
    route_get,
    snapshot,
    state_dir_for,
    vpn_argv,
    wait_until,
)

pytestmark = pytest.mark.netns

NAME = "sshd.lab.test"
OLD, NEW = "198.18.0.1", "198.18.0.7"


def start_dns(lab: Lab, address: str) -> subprocess.Popen:
    """dnsmasq on the server's client-side address: the client's original resolver says NAME is `address`."""
    argv = _dnsmasq_argv(lab, "moves", [OLD], [f"--host-record={NAME},{address}", "--local=/lab.test/"])
    proc = lab.popen(lab.server, argv)
    wait_tcp_port(lab, lab.server, OLD, DNS_PORT)
    return proc


def test_reconnect_follows_the_server_to_its_new_address(
    lab: Lab, lab_services: TargetServices, client_baseline: NetSnapshot
) -> None:
    lab.run(lab.server, ["ip", "addr", "add", f"{NEW}/24", "dev", lab.server_client_if], check=True)
    server = lab.sshd(port=0, also_listen=(NEW,))
    host_key = server.known_hosts.read_text().split()[1:3]
    with server.known_hosts.open("a") as known:
        known.write(f"[{NAME}]:{server.port} {' '.join(host_key)}\n")
    dns = start_dns(lab, OLD)
    argv = [a if a != f"{server.user}@{server.host}" else f"{server.user}@{NAME}" for a in vpn_argv(server)]
    argv += ["--state-dir", str(state_dir_for(lab)), "--vpn-dns", "off"]
    argv += ["--keepalive-interval", "1", "--keepalive-count-max", "2", "--retry-initial", "0.5"]
    vpn = VpnProcess(lab, server, argv=argv).start()
    try:
        url = lab_services.http.url(lab.target_addr.v4, "1k.bin")
        assert curl(lab, url, "--fail", "--output", "/dev/null").returncode == 0, vpn.describe()
        # The move: the name now points elsewhere, the old address refuses SSH, the session drops.
        lab.kill(dns)
        start_dns(lab, NEW)
        refuse = "add table ip moved\nadd chain ip moved in { type filter hook input priority 0; }\n"
        refuse += f"add rule ip moved in ip daddr {OLD} tcp dport {server.port} reject with tcp reset\n"
        lab.run(lab.server, ["nft", "-f", "-"], input=refuse, check=True)
        kill_connection(server)
        moved_at = time.monotonic()
        assert wait_until(lambda: "reconnected" in vpn.output, 30), vpn.describe()
        assert f"now resolves to {NEW}" in vpn.output, vpn.describe()
        assert "x2ssh0" not in route_get(lab, NEW), "the new server address must bypass the tunnel"
        assert curl(lab, url, "--fail", "--output", "/dev/null").returncode == 0, vpn.describe()
        print(f"reconnected to the moved server {time.monotonic() - moved_at:.1f} s after the move")
    finally:
        vpn.interrupt()
        vpn.wait()
        lab.run(lab.server, ["nft", "delete", "table", "ip", "moved"])
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)
