"""netstack on a real TUN device: the kernel's own TCP client talks to flows terminated in netstack."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.netns


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"x2n-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _serve(ns: str, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.netstack_tun", "serve", "--mode", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    return proc


def _stop(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(input="", timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def _client(ns: str, *args: str, timeout: float = 240) -> dict:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "benchmarks.netstack_tun", "client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("host", ["198.19.99.7", "fd58:3278:7373:99::7"])
def test_kernel_client_echo_100mb_byte_exact(netns, host):
    server = _serve(netns, "echo")
    try:
        result = _client(netns, host, "5001", "--bytes", str(100_000_000), "--echo")
    finally:
        stats = _stop(server)["stats"]
    (flow,) = result["flows"]
    assert flow["sent"] == flow["received"] == 100_000_000
    assert flow["sent_sha256"] == flow["received_sha256"]
    assert stats["flows_live"] == 0


def test_many_parallel_flows_and_nothing_left_behind(netns):
    server = _serve(netns, "sink")
    try:
        result = _client(netns, "198.19.99.7", "8080", "--bytes", "2000000", "--flows", "64")
    finally:
        report = _stop(server)
    assert result["bytes"] == 64 * 2_000_000
    assert report["sink_bytes"] == 64 * 2_000_000
    assert report["stats"]["flows_live"] == 0


def test_idle_flows_are_all_released_when_apps_close(netns):
    """200 idle connections held open, then closed by the apps: the stack keeps no flow behind."""
    server = _serve(netns, "hold")
    try:
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                sys.executable,
                "-m",
                "benchmarks.netstack_tun",
                "hold",
                "198.19.99.7",
                "22",
                "--flows",
                "200",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(proc.stdout.readline())["open"] == 200
        proc.communicate(input="\n", timeout=60)
        time.sleep(1)  # let the last FINs reach the stack
    finally:
        report = _stop(server)
    assert report["stats"]["tcp_over_limit"] == 0
    assert report["stats"]["flows_live"] == 0
