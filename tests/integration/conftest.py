"""Fixtures for integration tests: a namespace lab with a real sshd and the standard services.

`lab` is module-scoped: each test module gets its own namespaces (unique names, removed afterwards).
Tests using these fixtures must be marked `@pytest.mark.netns` (skipped where namespaces are unavailable).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.lab import Lab, cleanup_stale
from benchmarks.services import TargetServices, start_target_services
from benchmarks.sshd import SshServer
from tests.integration.vpn_runner import NetSnapshot, VpnLauncher, snapshot


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """client -- server -- target namespaces; see benchmarks/lab.py for addresses and interfaces."""
    cleanup_stale()  # labs left by crashed runs whose owner process is gone
    with Lab() as built:
        yield built


@pytest.fixture(scope="module")
def lab_sshd(lab: Lab) -> SshServer:
    """A real OpenSSH sshd in the server namespace on port 22 of the server's client-link v4 and v6
    addresses; stopped with the lab."""
    return lab.sshd()


@pytest.fixture(scope="module")
def lab_services(lab: Lab) -> TargetServices:
    """HTTP (1k.bin, big.bin = 100 MiB), TCP/UDP echo, iperf3, dnsmasq (target and server side); stopped
    with the lab. See benchmarks/services.py."""
    return start_target_services(lab)


# -- x2ssh --vpn in the lab (appended for the VPN end-to-end tests; see tests/integration/vpn_runner.py) -----


@pytest.fixture(scope="module")
def client_baseline(lab: Lab) -> NetSnapshot:
    """The client namespace's routes, rules, links and resolv.conf before any x2ssh ran in this module."""
    return snapshot(lab)


@pytest.fixture
def vpn_launcher(lab: Lab, client_baseline: NetSnapshot) -> Iterator[VpnLauncher]:
    """`vpn_launcher.start(server, *options)`; the baseline snapshot is taken before the first start."""
    launcher = VpnLauncher(lab)
    try:
        yield launcher
    finally:
        launcher.stop_all()
