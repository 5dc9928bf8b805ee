"""`x2ssh --vpn -D` (issue 12's optional item) in the namespace lab, real sshd, started by a laptop user with
`sudo -E`: the SOCKS5/HTTP CONNECT proxy runs beside the VPN on the same SSH session.

The VPN excludes the target's IPv4 network (`--vpn-exclude`), as a user would exclude the server's own LAN;
the client has no route there of its own, so the target's IPv4 address is reachable only through the proxy,
and its IPv6 address only through the tunnel. The proxy's port belongs to the user, not root (x2ssh gave up
root after starting its helper); it survives a reconnect; it goes away with the VPN, which restores the
namespace exactly; a LAN bind without credentials is refused before anything changes.
"""

from __future__ import annotations

import json
import pwd
import signal
import subprocess
from collections.abc import Iterator

import pytest

from benchmarks.lab import TARGET_NET_V4, Lab
from benchmarks.services import TargetServices
from benchmarks.sshd import SshServer
from tests.integration.laptop_user import HOST_ALIAS, LaptopUser, vpn_as
from tests.integration.test_proxy_mode import CURL_SOCKS_REFUSED, UDP_CLIENT
from tests.integration.vpn_runner import (
    EXIT_SIGTERM,
    NetSnapshot,
    VpnProcess,
    assert_no_unhandled_exceptions,
    kill_connection,
    snapshot,
    wait_until,
)
from x2ssh.status_report import check_status

pytestmark = pytest.mark.netns

PROXY_PORT = 1080
SOCKS = f"127.0.0.1:{PROXY_PORT}"
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@pytest.fixture(scope="module")
def dana(lab_sshd: SshServer) -> Iterator[LaptopUser]:
    with LaptopUser.create(lab_sshd) as user:
        yield user


@pytest.fixture(scope="module")
def run(
    lab: Lab,
    lab_sshd: SshServer,
    lab_services: TargetServices,
    client_baseline: NetSnapshot,
    dana: LaptopUser,
) -> Iterator[VpnProcess]:
    extra = ("-D", SOCKS, "--vpn-exclude", TARGET_NET_V4, "--retry-initial", "0.3")
    vpn = vpn_as(lab, lab_sshd, dana, "sudo -E", *extra).start()
    try:
        assert wait_until(lambda: "proxy up" in vpn.output, 30), vpn.describe()
        yield vpn
    finally:
        vpn.stop()


def curl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """curl in the client namespace; stdout is the HTTP status code."""
    argv = ["curl", "--silent", "--show-error", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}"]
    return lab.run(lab.client, [*argv, *args], timeout=60)


def listeners(lab: Lab, port: int) -> list[int]:
    """The uids of the TCP sockets listening on `port` in the client namespace (IPv4 and IPv6)."""
    uids = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = lab.run(lab.client, ["cat", table], timeout=10).stdout.splitlines()[1:]
        for fields in (line.split() for line in lines):
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == LISTEN:
                uids.append(int(fields[7]))
    return uids


def test_the_proxy_reaches_what_the_vpn_excludes(
    lab: Lab, lab_services: TargetServices, run: VpnProcess
) -> None:
    v4 = lab_services.http.url(lab.target_addr.v4, "1k.bin")
    v6 = lab_services.http.url(lab.target_addr.v6, "1k.bin")
    assert curl(lab, "--max-time", "3", v4).stdout != "200"  # excluded from the tunnel, no route of its own
    done = curl(lab, v6)
    assert done.stdout == "200", done.stderr + run.describe()  # the tunnel carries the rest
    for args in (("--socks5", SOCKS, v4), ("--socks5-hostname", SOCKS, "http://lab.test/1k.bin")):
        done = curl(lab, *args)
        assert done.stdout == "200", done.stderr + run.describe()


def test_http_connect_and_refused_port_beside_the_vpn(
    lab: Lab, lab_services: TargetServices, run: VpnProcess
) -> None:
    done = curl(
        lab, "--proxytunnel", "-x", f"http://{SOCKS}", lab_services.http.url(lab.target_addr.v4, "1k.bin")
    )
    assert done.stdout == "200", done.stderr
    closed = f"http://{lab.target_addr.v4}:{lab_services.closed_port}/"
    done = curl(lab, "--socks5", SOCKS, closed)
    assert done.returncode == CURL_SOCKS_REFUSED and "(5)" in done.stderr, done.stderr


def test_udp_associate_shares_the_vpns_agent(lab: Lab, lab_services: TargetServices, run: VpnProcess) -> None:
    """The agent's replies reach the proxy's association, not the TUN (the VPN's UDP goes on beside)."""
    argv = ["python3", "-c", UDP_CLIENT, str(PROXY_PORT), lab.target_addr.v4, str(lab_services.udp_echo.port)]
    done = lab.run(lab.client, argv, timeout=90)
    assert done.stdout.strip() == "echo ok", done.stdout + done.stderr + run.describe()


def test_the_port_is_the_users_not_roots(lab: Lab, dana: LaptopUser, run: VpnProcess) -> None:
    assert listeners(lab, PROXY_PORT) == [pwd.getpwnam(dana.name).pw_uid], run.describe()


def test_the_proxy_works_after_a_reconnect(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, run: VpnProcess
) -> None:
    kill_connection(lab_sshd)
    assert wait_until(lambda: "reconnected" in run.output, 30), run.describe()
    url = lab_services.http.url
    for args in (
        ("--socks5", SOCKS, url(lab.target_addr.v4, "1k.bin")),
        (url(lab.target_addr.v6, "1k.bin"),),
    ):
        done = curl(lab, *args)  # the proxy, then the tunnel beside it: both on the new connection
        assert done.stdout == "200", done.stderr + run.describe()


def test_status_shows_the_proxy_then_it_stops_with_the_vpn(
    lab: Lab, client_baseline: NetSnapshot, dana: LaptopUser, run: VpnProcess
) -> None:
    """Last in this module: the status document names the proxy and counts its clients; SIGTERM ends both,
    the port is closed and the namespace is as before."""
    status = lab.run(lab.client, dana.argv("plain", "status", "--json"), timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    doc = json.loads(status.stdout)
    assert check_status(doc) == [] and doc["state"] == "up" and doc["tun"] is not None, doc
    assert doc["proxy"] == SOCKS and doc["reconnects"] == 1, doc
    assert doc["tcp"]["total"] >= 5 and doc["tcp"]["refused"] >= 1, doc  # the proxy's clients above
    run.send_signal(signal.SIGTERM)
    assert run.wait() == EXIT_SIGTERM, run.describe()
    assert listeners(lab, PROXY_PORT) == []
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)
    assert_no_unhandled_exceptions(run)


def test_lan_bind_without_credentials_is_refused_before_anything(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, dana: LaptopUser
) -> None:
    argv = dana.argv("plain", "--vpn", "-D", "0.0.0.0:1081", HOST_ALIAS)
    done = lab.run(lab.client, argv, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--allow-lan" in done.stderr and "username and password" in done.stderr, done.stderr
    assert "VPN up" not in done.stderr and "proxy up" not in done.stderr, done.stderr
    assert listeners(lab, 1081) == []
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)
