"""`x2ssh --vpn` end to end, issue 11: ping, unreachable errors, no off-path injection, any sshd, re-attach.

Real sshd, real ping, dig and kernel sockets in the namespace lab. The server user is root; whether it may
open unprivileged ping sockets is `net.ipv4.ping_group_range` of the server namespace (it governs IPv6 ping
sockets too), which these tests set inside that namespace only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.lab import Lab
from benchmarks.services import DNS_ZONE, TargetServices
from benchmarks.sshd import SshServer
from tests.integration.vpn_runner import (
    TUN_DNS_V4,
    VpnLauncher,
    VpnProcess,
    assert_no_unhandled_exceptions,
    kill_connection,
    udp_echo,
    wait_until,
)

pytestmark = pytest.mark.netns

PING_ALLOWED = "0 2147483647"
PING_REFUSED = "1 0"
FAST_RETRY = ("--retry-initial", "0.5", "--retry-max-delay", "2")
APP_TIMEOUT = 5.0  # what the probing "app" waits for an answer before calling it a timeout

# Runs in the client namespace: a connected UDP socket sends one datagram and waits APP_TIMEOUT seconds.
# Prints "refused" (ECONNREFUSED: the ICMP error arrived), "reply", "timeout" or the error's name.
CONNECTED_UDP_PROBE = r"""
import errno, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.connect((host, port))
started = time.monotonic()
s.send(b"anyone there?")
try:
    s.recv(100)
    outcome = "reply"
except ConnectionRefusedError:
    outcome = "refused"
except socket.timeout:
    outcome = "timeout"
except OSError as e:
    outcome = errno.errorcode.get(e.errno, str(e))
print(outcome, "%.4f" % (time.monotonic() - started))
"""

# Runs in the target namespace: a "resolver" on HOST:53 that tells the test (stdout) where each query came
# from, then, when told on stdin, answers it: first forged answers from elsewhere, then the real one.
SILENT_RESOLVER = r"""
import socket, sys
host = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, 53))
print("ready", flush=True)
query, peer = s.recvfrom(2048)
print("query from %s %d" % peer, flush=True)
sys.stdin.readline()
answer = query[:2] + b"\x81\x80" + query[4:]
for spoof_source in [(sys.argv[2], 5300), (host, 5353)]:  # another host; the right host, wrong port
    forged = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forged.bind(spoof_source)
    forged.sendto(answer[:2] + b"FORGED", peer)
    forged.close()
s.sendto(answer, peer)
print("answered", flush=True)
"""

# Runs in the client namespace: one DNS-shaped query to HOST:53, then collect what comes back for a while.
DNS_APP = r"""
import json, socket, sys, time
host = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
s.sendto(b"\x4b\x1d\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x04test\x00\x00\x01\x00\x01", (host, 53))
print("sent", flush=True)
s.settimeout(1.0)
got = []
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        data, source = s.recvfrom(2048)
    except socket.timeout:
        continue
    got.append([data.hex(), source[0], source[1]])
print(json.dumps(got), flush=True)
"""

# Runs in the target namespace: a UDP echo that records the source (address, port) of every datagram.
RECORDING_ECHO = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    print("%f %s %d %s" % (time.monotonic(), peer[0], peer[1], data.decode()), flush=True)
    s.sendto(data, peer)
"""

# Runs in the client namespace: ONE socket sends a numbered datagram every 0.3 s for `seconds` and prints
# each echo it gets back: the same app flow before and after the SSH connection is replaced.
STEADY_APP = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.3)
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    n += 1
    s.sendto(b"%d" % n, (host, port))
    try:
        while True:
            print("echo " + s.recv(100).decode(), flush=True)
    except socket.timeout:
        pass
print("done", flush=True)
"""


def set_ping_group_range(lab: Lab, value: str) -> None:
    done = lab.run(lab.server, ["sysctl", "-q", "-w", f"net.ipv4.ping_group_range={value}"])
    assert done.returncode == 0, done.stderr


def ping(lab: Lab, host: str, count: int = 3) -> subprocess.CompletedProcess:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.3", "-W", str(int(APP_TIMEOUT)), host]
    return lab.run(lab.client, argv, timeout=count * APP_TIMEOUT + 30)


def connected_udp(lab: Lab, host: str, port: int) -> str:
    argv = [sys.executable, "-c", CONNECTED_UDP_PROBE, host, str(port), str(APP_TIMEOUT)]
    done = lab.run(lab.client, argv, timeout=APP_TIMEOUT + 30)
    assert done.returncode == 0, done.stderr
    outcome, seconds = done.stdout.split()
    print(f"connected UDP socket to [{host}]:{port}: {outcome} after {seconds} s")  # a number, not a test
    return outcome


def dig(lab: Lab, *args: str) -> list[str]:
    done = lab.run(lab.client, ["dig", "+short", "+time=2", "+tries=3", *args], timeout=30)
    return done.stdout.split() if done.returncode == 0 else [f"dig exit {done.returncode}: {done.stdout}"]


def read_line(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    """The next stdout line of `proc` (bounded)."""
    assert proc.stdout is not None
    result: list[str] = []

    def reader() -> None:
        result.append(proc.stdout.readline().decode().strip())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"no line from {proc.args!r} within {timeout} s"
    return result[0]


@pytest.fixture(scope="class")
def shared_vpn(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, client_baseline
) -> Iterator[VpnProcess]:
    set_ping_group_range(lab, PING_ALLOWED)
    vpn = VpnProcess(lab, lab_sshd, "--vpn-dns", "remote")
    try:
        vpn.start()
        assert wait_until(lambda: "UDP agent up" in vpn.output, 30), vpn.describe()
        yield vpn
    finally:
        vpn.stop()
        set_ping_group_range(lab, PING_REFUSED)
    assert_no_unhandled_exceptions(vpn)


class TestOneVpnRun:
    """One x2ssh run (`--vpn-dns remote`, the server may ping) serves all of these."""

    # -- ping ------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("family", ["v4", "v6"])
    def test_ping_gets_real_replies(self, lab: Lab, shared_vpn: VpnProcess, family: str) -> None:
        host = getattr(lab.target_addr, family)
        done = ping(lab, host)
        assert done.returncode == 0, f"{done.stdout}{done.stderr}{shared_vpn.describe()}"
        assert "3 received" in done.stdout, done.stdout
        assert done.stdout.count(f"bytes from {host}") == 3, done.stdout
        print(f"ping {host}: {done.stdout.strip().splitlines()[-1]}")  # the real round-trip times

    def test_ping_to_a_missing_host_is_never_answered(self, lab: Lab, shared_vpn: VpnProcess) -> None:
        """No fake replies: nobody has 198.19.0.77, so nothing may say "bytes from" it."""
        done = ping(lab, "198.19.0.77", count=2)
        assert done.returncode != 0
        assert "bytes from" not in done.stdout, done.stdout

    # -- unreachable errors and anti-spoofing ----------------------------------------------------------------

    @pytest.mark.parametrize("family", ["v4", "v6"])
    def test_udp_to_a_closed_port_is_refused(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess, family: str
    ) -> None:
        """As on a plain network: ECONNREFUSED from the ICMP port unreachable, not the app's 5 s timeout."""
        host = getattr(lab.target_addr, family)
        assert connected_udp(lab, host, lab_services.closed_port) == "refused", shared_vpn.describe()
        # ... and the same kind of socket to an open port still gets its answer.
        assert connected_udp(lab, host, lab_services.udp_echo.port) == "reply", shared_vpn.describe()

    def test_forged_dns_answers_from_elsewhere_are_not_delivered(
        self, lab: Lab, shared_vpn: VpnProcess
    ) -> None:
        """A "resolver" at 198.19.0.53 receives the query through the agent; before it answers, forged answers
        are sent to the agent's socket from another host (198.19.0.2:53) and from the right host's wrong port.
        Only the real answer reaches the app."""
        resolver_ip = "198.19.0.53"
        added = lab.run(lab.target, ["ip", "addr", "add", f"{resolver_ip}/32", "dev", lab.target_if])
        assert added.returncode == 0, added.stderr
        server = lab.popen(
            lab.target,
            [sys.executable, "-c", SILENT_RESOLVER, resolver_ip, lab.target_addr.v4],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        app = None
        try:
            assert read_line(server) == "ready"
            app = lab.popen(
                lab.client, [sys.executable, "-c", DNS_APP, resolver_ip, "4"], stdout=subprocess.PIPE
            )
            assert read_line(app) == "sent"
            query_from = read_line(server)
            assert query_from.startswith(f"query from {lab.server_target_side.v4} "), query_from
            server.stdin.write(b"go\n")
            server.stdin.flush()
            assert read_line(server) == "answered"
            got = json.loads(read_line(app, timeout=30))
        finally:
            for proc in (app, server):
                if proc is not None:
                    lab.kill(proc)
            lab.run(lab.target, ["ip", "addr", "del", f"{resolver_ip}/32", "dev", lab.target_if])
        assert len(got) == 1, f"the app got {got}{shared_vpn.describe()}"
        data, source, port = got[0]
        assert (source, port) == (resolver_ip, 53)
        assert b"FORGED" not in bytes.fromhex(data)


# -- ping where the server may not -------------------------------------------------------------------------


def test_ping_where_the_server_may_not_is_filtered_at_once(
    lab: Lab, lab_sshd: SshServer, vpn_launcher: VpnLauncher
) -> None:
    set_ping_group_range(lab, PING_REFUSED)
    vpn = vpn_launcher.start(lab_sshd)
    assert wait_until(lambda: "UDP agent up" in vpn.output, 30), vpn.describe()
    v4 = ping(lab, lab.target_addr.v4, count=2)
    v6 = ping(lab, lab.target_addr.v6, count=2)
    assert "bytes from" not in v4.stdout + v6.stdout
    assert "Packet filtered" in v4.stdout, f"{v4.stdout}{vpn.describe()}"
    assert "Administratively prohibited" in v6.stdout, f"{v6.stdout}{vpn.describe()}"
    reason = [line for line in vpn.lines if "ping through the tunnel is not possible" in line]
    assert len(reason) == 1, vpn.describe()
    assert "ping_group_range" in reason[0]


# -- any sshd: the agent over its exec channel ------------------------------------------------------------


def test_agent_over_stdio_where_streamlocal_is_refused(
    lab: Lab, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    server = lab.sshd(extra_config="AllowStreamLocalForwarding no", port=0)
    try:
        vpn = vpn_launcher.start(server, "--vpn-dns", "remote")
        assert wait_until(lambda: "over stdio" in vpn.output, 20), vpn.describe()
        sizes = [1, 1400, 8000, 60000]
        results = udp_echo(lab, lab.target_addr.v4, lab_services.udp_echo.port, sizes)
        assert results == dict.fromkeys(sizes, "ok"), f"{results}{vpn.describe()}"
        assert dig(lab, f"@{TUN_DNS_V4}", DNS_ZONE, "A") == [lab.target_addr.v4], vpn.describe()
        assert "DNS over TCP" not in vpn.output, vpn.describe()
    finally:
        vpn_launcher.stop_all()
        server.stop()


# -- re-attach after a reconnect ---------------------------------------------------------------------------


def test_udp_flow_keeps_its_server_side_port_across_a_reconnect(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    port = 7777
    echo = lab.popen(
        lab.target,
        [sys.executable, "-c", RECORDING_ECHO, lab.target_addr.v4, str(port)],
        stdout=subprocess.PIPE,
    )
    app = None
    try:
        assert read_line(echo) == "ready"
        vpn = vpn_launcher.start(lab_sshd, *FAST_RETRY)
        # Once the agent runs, no session shell is half-way through root's ~/.bashrc (see kill_connection).
        assert udp_echo(lab, lab.target_addr.v4, lab_services.udp_echo.port, [10]) == {10: "ok"}, (
            vpn.describe()
        )
        app = lab.popen(
            lab.client,
            [sys.executable, "-c", STEADY_APP, lab.target_addr.v4, str(port), "40"],
            stdout=subprocess.PIPE,
        )
        assert read_line(app).startswith("echo "), vpn.describe()
        _, *before, _ = read_line(echo).split()
        kill_connection(lab_sshd)

        def agent_back() -> bool:  # re-attached to the same agent, or (the failure) a new one deployed
            return "re-attached" in vpn.output or vpn.output.count("UDP agent up") > 1

        assert wait_until(agent_back, 60), vpn.describe()
        reattached_at = time.monotonic()
        # The same app socket's datagrams reach the target again (the clocks are the machine's one
        # CLOCK_MONOTONIC): every one came from the same server-side address and port.
        sources, after = set(), None
        while after is None:
            when, host, src_port, number = read_line(echo, timeout=30).split()
            sources.add((host, src_port))
            if float(when) > reattached_at:
                after = int(number)
        # ... and their echoes reach the app.
        while True:
            line = read_line(app, timeout=30)
            assert line.startswith("echo "), line
            if int(line.split()[1]) >= after:
                break
    finally:
        for proc in (app, echo):
            if proc is not None:
                lab.kill(proc)
    assert sources == {tuple(before)}, f"the target saw {sources} after {before}{vpn.describe()}"
