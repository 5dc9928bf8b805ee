"""`x2ssh -D` (issue 12) in the namespace lab, run by a normal user without sudo: curl through SOCKS5 (names
resolved by the server's resolver) and HTTP CONNECT, UDP ASSOCIATE through the real agent, a refused port's
reply code, a reconnect, and the bind rule. The client namespace has no route to the target: whatever
reaches it went through the SSH server."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from benchmarks.sshd import SshServer
from tests.integration.laptop_user import HOST_ALIAS, LaptopUser
from tests.integration.vpn_runner import VpnProcess, kill_connection, wait_until
from x2ssh.status_report import check_status

pytestmark = pytest.mark.netns

PROXY_PORT = 1080
SOCKS = f"127.0.0.1:{PROXY_PORT}"
CURL_SOCKS_REFUSED = 97  # curl: "proxy handshake error", with the SOCKS reply code in its message

# Runs in the client namespace: UDP ASSOCIATE, one datagram to the echo server, prints the echoed bytes' hex.
UDP_CLIENT = r"""
import socket, struct, sys
proxy, target, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
control = socket.create_connection(("127.0.0.1", proxy), timeout=10)
control.sendall(b"\x05\x01\x00")
assert control.recv(2) == b"\x05\x00"
control.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
reply = control.recv(10)
assert reply[:2] == b"\x05\x00", reply
relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(10)
payload = bytes(range(256)) * 4
header = b"\x00\x00\x00\x01" + socket.inet_aton(target) + struct.pack("!H", port)
for attempt in range(5):  # the agent may still be starting
    udp.sendto(header + payload, relay)
    try:
        data, _ = udp.recvfrom(65536)
        break
    except socket.timeout:
        continue
else:
    print("no answer"); sys.exit(1)
assert data[:10] == header, data[:10]
print("echo ok" if data[10:] == payload else "echo differs")
"""


@pytest.fixture(scope="module")
def erin(lab_sshd: SshServer) -> Iterator[LaptopUser]:
    user = LaptopUser.create(lab_sshd)
    try:
        yield user
    finally:
        user.remove()


def start_proxy(lab: Lab, server: SshServer, user: LaptopUser, *extra: str) -> VpnProcess:
    argv = user.argv("plain", "-D", f"127.0.0.1:{PROXY_PORT}", HOST_ALIAS, "--retry-initial", "0.3", *extra)
    proxy = VpnProcess(lab, server, argv=argv).start(wait_up=False)
    assert wait_until(lambda: "proxy up" in proxy.output or not proxy.running, 45), proxy.describe()
    assert proxy.running, proxy.describe()
    return proxy


def curl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return lab.run(lab.client, ["curl", "--silent", "--show-error", "--max-time", "60", *args], timeout=90)


def status_code(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """curl through the proxy; stdout is the HTTP status code."""
    return curl(lab, *args, "-o", "/dev/null", "-w", "%{http_code}")


@pytest.fixture(scope="module")
def proxy(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, erin: LaptopUser
) -> Iterator[VpnProcess]:
    run = start_proxy(lab, lab_sshd, erin)
    try:
        yield run
    finally:
        run.stop()


def test_the_client_cannot_reach_the_target_directly(lab: Lab, lab_services: TargetServices) -> None:
    url = lab_services.http.url(lab.target_addr.v4, "1k.bin")
    done = curl(lab, "--max-time", "3", url, "-o", "/dev/null")
    assert done.returncode != 0


def test_socks5_hostname_resolved_by_the_server(
    lab: Lab, lab_services: TargetServices, proxy: VpnProcess
) -> None:
    """`lab.test` is known only to the server's resolver; sshd gets the address, not the name."""
    done = status_code(lab, "--socks5-hostname", SOCKS, "http://lab.test/1k.bin")
    assert done.stdout == "200", done.stderr + proxy.describe()


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_socks5_big_download_byte_exact(
    lab: Lab, lab_services: TargetServices, proxy: VpnProcess, family: str
) -> None:
    served = lab_services.http.files["big.bin"]
    url = lab_services.http.url(getattr(lab.target_addr, family), "big.bin")
    done = lab.run(lab.client, ["curl", "--silent", "--socks5", f"127.0.0.1:{PROXY_PORT}", url], text=False,
                   timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == served.sha256


def test_http_connect(lab: Lab, lab_services: TargetServices, proxy: VpnProcess) -> None:
    url = lab_services.http.url(lab.target_addr.v4, "1k.bin")
    done = status_code(lab, "--proxytunnel", "-x", f"http://{SOCKS}", url)
    assert done.stdout == "200", done.stderr


def test_closed_port_is_connection_refused(lab: Lab, lab_services: TargetServices, proxy: VpnProcess) -> None:
    done = curl(lab, "--socks5", SOCKS, f"http://{lab.target_addr.v4}:{lab_services.closed_port}/")
    assert done.returncode == CURL_SOCKS_REFUSED and "(5)" in done.stderr, done.stderr  # 5: refused


def test_udp_associate_through_the_agent(lab: Lab, lab_services: TargetServices, proxy: VpnProcess) -> None:
    argv = ["python3", "-c", UDP_CLIENT, str(PROXY_PORT), lab.target_addr.v4, str(lab_services.udp_echo.port)]
    done = lab.run(lab.client, argv, timeout=90)
    assert done.stdout.strip() == "echo ok", done.stdout + done.stderr + proxy.describe()


def test_new_requests_work_after_the_connection_is_killed(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, proxy: VpnProcess
) -> None:
    kill_connection(lab_sshd)
    assert wait_until(lambda: "reconnected" in proxy.output, 30), proxy.describe()
    done = status_code(lab, "--socks5", SOCKS, lab_services.http.url(lab.target_addr.v4, "1k.bin"))
    assert done.stdout == "200", done.stderr + proxy.describe()
    assert proxy.running


def test_lan_bind_without_credentials_is_refused(lab: Lab, lab_sshd: SshServer, erin: LaptopUser) -> None:
    argv = erin.argv("plain", "-D", "0.0.0.0:1081", HOST_ALIAS)
    done = lab.run(lab.client, argv, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--allow-lan" in done.stderr and "username and password" in done.stderr, done.stderr
    assert "proxy down" not in done.stderr  # refused before connecting anywhere


def test_status_and_down_reach_the_proxy_run(
    lab: Lab, lab_services: TargetServices, erin: LaptopUser, proxy: VpnProcess
) -> None:
    """Last in this module: `x2ssh status` finds the run in the user's runtime directory and shows the rate
    of a download in progress; `down` ends the run."""
    url = lab_services.http.url(lab.target_addr.v4, "big.bin")
    slow = ["curl", "-sS", "--socks5", SOCKS, "--limit-rate", "1M", "-o", "/dev/null", url]
    download = lab.popen(lab.client, slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        doc: dict = {}

        def moving() -> bool:
            nonlocal doc
            status = lab.run(lab.client, erin.argv("plain", "status", "--json"), timeout=60)
            assert status.returncode == 0, status.stdout + status.stderr
            doc = json.loads(status.stdout)
            return doc["rates"]["down_bps"] > 0

        assert wait_until(moving, 30), doc
    finally:
        lab.kill(download)
    assert check_status(doc) == [] and doc["state"] == "up" and doc["tun"] is None, doc
    assert doc["reconnects"] == 1 and doc["tcp"]["total"] >= 5, doc  # the tests above
    assert doc["tcp"]["open"] >= 1 and doc["bytes"]["down"] > 0, doc
    down = lab.run(lab.client, erin.argv("plain", "down"), timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert wait_until(lambda: not proxy.running, 30), proxy.describe()
