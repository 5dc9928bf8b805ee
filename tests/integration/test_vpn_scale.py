"""Many flows through a stock sshd (issue 10): an sshd whose open-files limit is 1024, as under systemd,
holds about a thousand channels per connection; x2ssh spreads 10,000 concurrent flows over a pool of SSH
connections and none of them fails. Namespace lab, real sshd, a real TCP echo server."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.lab import Lab
from benchmarks.procstat import rss_kib
from benchmarks.services import TargetServices
from tests.integration.vpn_runner import REPO, VpnLauncher

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FLOWS = 10_000
SSHD_NOFILE = 1024


def test_ten_thousand_concurrent_flows_through_an_sshd_with_1024_files(
    lab: Lab, lab_services: TargetServices, vpn_launcher: VpnLauncher, record_property
) -> None:
    server = lab.sshd(port=0, nofile=SSHD_NOFILE)
    vpn = vpn_launcher.start(server, "--vpn-dns", "off")
    argv = [
        sys.executable, str(REPO / "benchmarks" / "clients.py"), "idle-flows",
        "--host", lab.target_addr.v4, "--port", str(lab_services.tcp_echo.port),
        "--count", str(FLOWS), "--hold", "3", "--parallel", "256",
    ]  # fmt: skip
    held_rss: list[int] = []
    proc = lab.popen(lab.client, argv, stdout=-1, stderr=-1, text=True)
    for line in proc.stderr:  # "holding N flows" once every flow is open: measure then
        if line.startswith("holding"):
            held_rss.append(rss_kib(vpn.pid))
    out = proc.stdout.read()
    assert proc.wait(300) == 0, out + vpn.describe()
    report = json.loads(out)
    pool_lines = [line for line in vpn.lines if "SSH connection" in line]
    numbers = {**report, "x2ssh_rss_kib_with_all_flows_open": held_rss[:1], "pool_log": pool_lines[-3:]}
    record_property("ten_thousand_flows", json.dumps(numbers))
    print(f"\n{FLOWS} flows: {numbers}")
    assert report["opened"] == FLOWS and report["failed"] == 0, f"{report}{vpn.describe()}"
    assert any("opened SSH connection extra-" in line for line in vpn.lines), vpn.describe()
    assert vpn.running, vpn.describe()
