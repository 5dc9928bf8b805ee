"""A server that refuses channels: every refused flow is reset at once, x2ssh keeps running, and the flows
the server does allow are not disturbed (issue 6, "hostile server"). Real sshd in the namespace lab, with
`PermitOpen` allowing only the target's HTTP port."""

from __future__ import annotations

import hashlib
import time

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from tests.integration.vpn_runner import VpnLauncher, curl

pytestmark = pytest.mark.netns


def test_refused_channels_fail_fast_and_leave_other_flows_alone(
    lab: Lab, lab_services: TargetServices, vpn_launcher: VpnLauncher, tmp_path
) -> None:
    http = lab_services.http
    target = lab.target_addr
    allowed = f"{target.v4}:{http.port} [{target.v6}]:{http.port}"
    server = lab.sshd(extra_config=f"PermitOpen {allowed}\n", port=0)
    vpn = vpn_launcher.start(server, "--vpn-dns", "off")
    big = http.files["big.bin"]
    out = tmp_path / "big.bin"
    download = lab.popen(
        lab.client,
        [
            "curl",
            "--silent",
            "--fail",
            "--limit-rate",
            "20M",
            "--output",
            str(out),
            http.url(target.v4, "big.bin"),
        ],
    )
    refused = 0
    started = time.monotonic()
    while download.poll() is None and refused < 200 and time.monotonic() - started < 60:
        port = lab_services.tcp_echo.port if refused % 2 else lab_services.closed_port
        done = curl(lab, f"http://{target.v4}:{port}/", "--output", "/dev/null", max_time=10)
        assert done.returncode == 7, (
            f"expected 'connection refused' (7), got {done.returncode}: {done.stderr}"
        )
        refused += 1
    assert refused >= 20, "the download ended before the server could refuse much"
    assert download.wait(120) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == big.sha256, "the allowed flow was disturbed"
    assert vpn.running, vpn.describe()
    again = curl(lab, http.url(target.v6, "1k.bin"), "--fail", "--output", "/dev/null")
    assert again.returncode == 0, again.stderr + vpn.describe()
    assert "Traceback" not in vpn.output


def test_server_without_forwarding_keeps_x2ssh_alive(
    lab: Lab, lab_services: TargetServices, vpn_launcher
) -> None:
    server = lab.sshd(extra_config="AllowTcpForwarding no\nAllowStreamLocalForwarding no\n", port=0)
    vpn = vpn_launcher.start(server, "--vpn-dns", "off")
    for _ in range(20):
        done = curl(
            lab, lab_services.http.url(lab.target_addr.v4, "1k.bin"), "--output", "/dev/null", max_time=10
        )
        assert done.returncode == 7, done.stderr
    assert vpn.running, vpn.describe()
    # Without streamlocal forwarding the agent is reached over its exec channel instead (issue 11).
    deadline = time.monotonic() + 45
    while "UDP agent up" not in vpn.output and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "over stdio" in vpn.output, vpn.describe()
    assert vpn.running
    vpn.interrupt()
    assert vpn.wait() == 130
