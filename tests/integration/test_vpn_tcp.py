"""`x2ssh --vpn` end to end, TCP (issue 3): real sshd, real curl, in the namespace lab.

The client reaches the target only through the tunnel (the server does not forward). Tests that only use
the tunnel share one x2ssh run (class `TestThroughTheTunnel`); tests of the run's lifecycle start their own
and compare the client namespace with the snapshot taken before any x2ssh ran in this module.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from benchmarks.sshd import SshServer
from tests.integration.vpn_runner import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    READY_MARKER,
    TUN_DNS_V4,
    TUN_DNS_V6,
    TUN_NAME,
    NetSnapshot,
    VpnLauncher,
    VpnProcess,
    curl,
    route_get,
    run_cleanup,
    snapshot,
)

pytestmark = pytest.mark.netns

PARALLEL_REQUESTS = 200
CURL_EXIT_COULDNT_CONNECT = 7
CURL_EXIT_TIMEOUT = 28

# Runs in the client namespace: one TCP connect, reported as "refused", "timeout", "connected" or the error.
CONNECT_PROBE = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as e:
    print("error: %s" % e)
"""


# Half-closes through the tunnel, byte-exact. The target side runs in the target namespace, the app side in
# the client namespace; each prints the sha256 and length of what it received.
# "server-first": the server sends its answer and shuts down writing; the app reads to the end and only then
# uploads; x2ssh closes the channel as soon as the app shuts down too, with the upload possibly still queued.
# "app-first": the app uploads and shuts down writing, then still reads the server's answer.
HALF_CLOSE_SERVER = r"""
import hashlib, socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
ls = socket.create_server(("0.0.0.0", port))
print("listening", flush=True)
conn, _ = ls.accept()
answer = hashlib.shake_256(b"answer").digest(300_000)
if mode == "server-first":
    conn.sendall(answer)
    conn.shutdown(socket.SHUT_WR)
got = bytearray()
while chunk := conn.recv(1 << 16):
    got += chunk
if mode == "app-first":
    conn.sendall(answer)
conn.close()
print(hashlib.sha256(got).hexdigest(), len(got), flush=True)
"""
HALF_CLOSE_APP = r"""
import hashlib, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
upload = hashlib.shake_256(b"upload").digest(6_000_000)
s = socket.create_connection((host, port), timeout=30)
if mode == "app-first":
    s.sendall(upload)
    s.shutdown(socket.SHUT_WR)
got = bytearray()
while chunk := s.recv(1 << 16):
    got += chunk
if mode == "server-first":
    s.sendall(upload)
s.close()
print(hashlib.sha256(got).hexdigest(), len(got), flush=True)
"""
HALF_CLOSE_PORT = 9411


def _digest(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_and_check(lab: Lab, services: TargetServices, host: str, name: str, max_time: float = 60) -> None:
    """Download `name` from the target's HTTP service at `host` and assert it is byte-exact."""
    served = services.http.files[name]
    out = lab.workdir / f"fetched-{name}"
    try:
        done = curl(lab, services.http.url(host, name), "--fail", "--output", str(out), max_time=max_time)
        assert done.returncode == 0, f"curl {name} from {host}: exit {done.returncode}: {done.stderr}"
        assert out.stat().st_size == served.size
        assert sha256_of(out) == served.sha256, f"{name} from {host} arrived corrupted"
    finally:
        out.unlink(missing_ok=True)


def assert_restored(before: NetSnapshot, lab: Lab, vpn: VpnProcess) -> None:
    after = snapshot(lab)
    assert after == before, f"client namespace not restored:\n{before.differences(after)}{vpn.describe()}"


def assert_vpn_in_place(before: NetSnapshot, lab: Lab, vpn: VpnProcess) -> None:
    """While x2ssh runs, its TUN exists and routes changed: so a later "restored" check is meaningful."""
    during = snapshot(lab)
    assert TUN_NAME in during.links, f"no {TUN_NAME} while the VPN is up{vpn.describe()}"
    assert during.routes_v4 != before.routes_v4, f"IPv4 routes unchanged while the VPN is up{vpn.describe()}"
    assert during.routes_v6 != before.routes_v6, f"IPv6 routes unchanged while the VPN is up{vpn.describe()}"


def test_client_cannot_reach_target_without_vpn(lab: Lab, lab_services: TargetServices) -> None:
    for host in (lab.target_addr.v4, lab.target_addr.v6):
        done = curl(lab, lab_services.http.url(host, "1k.bin"), "--output", "/dev/null", max_time=4)
        assert done.returncode != 0, f"client reached {host} without a tunnel: the lab forwards"


@pytest.fixture(scope="class")
def shared_vpn(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, client_baseline: NetSnapshot
) -> Iterator[VpnProcess]:
    vpn = VpnProcess(lab, lab_sshd)
    try:
        yield vpn.start()
    finally:
        vpn.stop()


class TestThroughTheTunnel:
    """One x2ssh run serves all of these."""

    def test_big_file_byte_exact(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess
    ) -> None:
        fetch_and_check(lab, lab_services, lab.target_addr.v4, "big.bin", max_time=180)
        assert shared_vpn.running, shared_vpn.describe()

    def test_parallel_short_requests_all_succeed(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess
    ) -> None:
        url = lab_services.http.url(lab.target_addr.v4, "1k.bin")
        argv = [
            "curl", "--silent", "--show-error", "--parallel", "--parallel-immediate",
            "--parallel-max", str(PARALLEL_REQUESTS), "--connect-timeout", "20", "--max-time", "60",
            "--header", "Connection: close",  # one TCP flow per request, not a few reused connections
            "--write-out", "%{http_code} %{size_download}\\n",
        ]  # fmt: skip
        for _ in range(PARALLEL_REQUESTS):
            argv += [url, "--output", "/dev/null"]
        done = lab.run(lab.client, argv, timeout=90)
        results = done.stdout.split("\n")[:-1]
        ok = [r for r in results if r == "200 1024"]
        assert len(ok) == PARALLEL_REQUESTS, (
            f"{len(ok)} of {PARALLEL_REQUESTS} requests succeeded (curl exit {done.returncode});"
            f" others: {sorted(set(results) - {'200 1024'})}; {done.stderr[-2000:]}{shared_vpn.describe()}"
        )

    def test_closed_port_is_refused_not_timed_out(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess
    ) -> None:
        host, port = lab.target_addr.v4, lab_services.closed_port
        # The open port first: so a refusal below is about the port, not a tunnel that does not work.
        fetch_and_check(lab, lab_services, host, "1k.bin")
        done = curl(lab, f"http://{host}:{port}/", "--output", "/dev/null", max_time=20)
        assert done.returncode == CURL_EXIT_COULDNT_CONNECT, (
            f"curl to closed port: exit {done.returncode} (7 = could not connect, 28 = timed out): "
            f"{done.stderr}{shared_vpn.describe()}"
        )
        for target in (host, lab.target_addr.v6):
            probe = lab.run(
                lab.client, [sys.executable, "-c", CONNECT_PROBE, target, str(port), "20"], timeout=40
            )
            assert probe.stdout.strip() == "refused", (
                f"connect to [{target}]:{port}: {probe.stdout}{probe.stderr}"
            )

    def test_ipv6_target(self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess) -> None:
        fetch_and_check(lab, lab_services, lab.target_addr.v6, "1k.bin")

    @pytest.mark.parametrize("mode", ["server-first", "app-first"])
    def test_half_close_loses_nothing_either_way(self, lab: Lab, shared_vpn: VpnProcess, mode: str) -> None:
        server = lab.popen(
            lab.target,
            [sys.executable, "-c", HALF_CLOSE_SERVER, mode, str(HALF_CLOSE_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "listening"
            app = lab.run(
                lab.client,
                [sys.executable, "-c", HALF_CLOSE_APP, mode, lab.target_addr.v4, str(HALF_CLOSE_PORT)],
                timeout=60,
            )
            server_out, _ = server.communicate(timeout=30)
        finally:
            lab.kill(server)
        answer = hashlib.shake_256(b"answer").digest(300_000)
        upload = hashlib.shake_256(b"upload").digest(6_000_000)
        assert app.stdout.strip() == _digest(answer), f"app received: {app.stdout}{app.stderr}"
        assert server_out.strip() == _digest(upload), f"server received: {server_out}{shared_vpn.describe()}"

    def test_routes_point_into_the_tunnel(
        self, lab: Lab, lab_sshd: SshServer, shared_vpn: VpnProcess
    ) -> None:
        assert f"dev {TUN_NAME}" in route_get(lab, lab.target_addr.v4)
        assert f"dev {TUN_NAME}" in route_get(lab, lab.target_addr.v6)
        # The SSH server keeps its original path: no routing loop.
        to_server = route_get(lab, lab_sshd.host)
        assert f"dev {lab.client_if}" in to_server and TUN_NAME not in to_server, to_server


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_exclude_keeps_original_path(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, vpn_launcher: VpnLauncher, family: str
) -> None:
    """Exclude the target's prefix of one family: its route keeps the original gateway, so (forwarding
    being off) it is unreachable; the other family still goes through the tunnel."""
    prefix = {"v4": "198.19.0.0/24", "v6": "fd58:3278:7373:2::/64"}[family]
    excluded = getattr(lab.target_addr, family)
    tunneled = lab.target_addr.v6 if family == "v4" else lab.target_addr.v4
    gateway = getattr(lab.server_client_side, family)
    vpn = vpn_launcher.start(lab_sshd, "--vpn-exclude", prefix)

    route = route_get(lab, excluded)
    assert f"via {gateway} dev {lab.client_if}" in route and TUN_NAME not in route, route
    blocked = curl(lab, lab_services.http.url(excluded, "1k.bin"), "--output", "/dev/null", max_time=4)
    assert blocked.returncode != 0, (
        f"excluded {excluded} was reachable: it went through the tunnel{vpn.describe()}"
    )
    assert f"dev {TUN_NAME}" in route_get(lab, tunneled)
    fetch_and_check(lab, lab_services, tunneled, "1k.bin")


@pytest.mark.parametrize(
    ("signum", "expected"),
    [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)],
    ids=["SIGINT", "SIGTERM"],
)
def test_signal_restores_everything(
    lab: Lab,
    lab_sshd: SshServer,
    lab_services: TargetServices,
    vpn_launcher: VpnLauncher,
    client_baseline: NetSnapshot,
    signum: int,
    expected: int,
) -> None:
    assert snapshot(lab) == client_baseline, "a previous test left the client namespace changed"
    vpn = vpn_launcher.start(lab_sshd)
    assert_vpn_in_place(client_baseline, lab, vpn)
    fetch_and_check(lab, lab_services, lab.target_addr.v4, "1k.bin")
    vpn.send_signal(signum)
    assert vpn.wait() == expected, vpn.describe()
    assert sum(READY_MARKER in line for line in vpn.lines) == 1, (
        f"not exactly one '{READY_MARKER}'{vpn.describe()}"
    )
    assert_restored(client_baseline, lab, vpn)


def test_sigkill_then_cleanup_restores_everything(
    lab: Lab, lab_sshd: SshServer, vpn_launcher: VpnLauncher, client_baseline: NetSnapshot
) -> None:
    vpn = vpn_launcher.start(lab_sshd)
    assert_vpn_in_place(client_baseline, lab, vpn)
    vpn.kill()
    assert vpn.wait() == -signal.SIGKILL
    done = run_cleanup(lab, vpn.state_dir)
    assert done.returncode == 0, f"--vpn-cleanup exit {done.returncode}: {done.stdout}{done.stderr}"
    assert_restored(client_baseline, lab, vpn)


def test_second_start_after_sigkill_cleans_up_and_works(
    lab: Lab,
    lab_sshd: SshServer,
    lab_services: TargetServices,
    vpn_launcher: VpnLauncher,
    client_baseline: NetSnapshot,
) -> None:
    first = vpn_launcher.start(lab_sshd)
    first.kill()
    assert first.wait() == -signal.SIGKILL
    second = vpn_launcher.start(lab_sshd)
    fetch_and_check(lab, lab_services, lab.target_addr.v4, "1k.bin")
    fetch_and_check(lab, lab_services, lab.target_addr.v6, "1k.bin")
    second.interrupt()
    assert second.wait() == EXIT_SIGINT, second.describe()
    assert_restored(client_baseline, lab, second)


def test_resolv_conf_points_into_the_tunnel(lab: Lab, lab_sshd: SshServer, vpn_launcher: VpnLauncher) -> None:
    vpn = vpn_launcher.start(lab_sshd, "--vpn-dns", "remote")
    resolv = lab.run(lab.client, ["cat", "/etc/resolv.conf"]).stdout
    servers = [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver ")]
    assert servers and all(s in (TUN_DNS_V4, TUN_DNS_V6) for s in servers), (
        f"resolv.conf during the VPN:\n{resolv}{vpn.describe()}"
    )
