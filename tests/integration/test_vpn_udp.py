"""`x2ssh --vpn` end to end, UDP through the server-side agent and remote DNS (issue 4).

Real sshd, real dig, dnsmasq and tcpdump in the namespace lab. `lab.test` is known only to the dnsmasq in
the target namespace, reached through the server namespace's own resolver (127.0.0.1, which forwards the
zone): so an answer proves the query was resolved on the server side, through the tunnel.

Datagram sizes: the TUN's MTU (65535 by default) bounds what crosses it unfragmented, so the echo test
asserts every size up to the largest unfragmented payload (MTU - 28 for IPv4, MTU - 48 for IPv6: 65,507,
the largest UDP payload IPv4 has, and 65,487 bytes). Only IPv6 can exceed that (up to 65,527 bytes): the
client kernel then fragments on the TUN, and fragments are not reassembled, so that case is an expected
failure and the path's limit is the unfragmented one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.lab import Lab
from benchmarks.services import DNS_ZONE, TargetServices
from benchmarks.sshd import SshServer
from tests.integration.vpn_runner import (
    EXIT_SIGINT,
    TUN_DNS_V4,
    TUN_DNS_V6,
    TUN_NAME,
    VpnLauncher,
    VpnProcess,
    agent_processes,
    assert_no_unhandled_exceptions,
    curl,
    pid_alive,
    udp_echo,
    wait_until,
)

pytestmark = pytest.mark.netns

CONCURRENT_FLOWS = 50
# An agent whose client vanished without GOODBYE waits `--reattach-grace` (60 s by default) for x2ssh to
# re-attach through a new connection, then exits (agent/PROTOCOL.md). Allow that plus scheduling slack.
AGENT_EXIT_BOUND = 80.0
FRAGMENTED_SIZE = 65_500  # IPv6 only: above MTU - 48 with the default MTU

# Runs in the client namespace: CONCURRENT_FLOWS sockets (distinct source ports: distinct flows) each send a
# payload of their own at once, then collect; unanswered ones are resent, a few rounds at most.
FLOWS_PROBE = r"""
import json, os, select, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(count)]
for s in socks:
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    s.setblocking(False)
payloads = [os.urandom(200) + i.to_bytes(4, "big") for i in range(count)]
index = {s.fileno(): i for i, s in enumerate(socks)}
pending, wrong, rounds = set(range(count)), {}, 0
while pending and rounds < 4:
    rounds += 1
    for i in sorted(pending):
        socks[i].sendto(payloads[i], (host, port))
    deadline = time.monotonic() + 3.0
    while pending and time.monotonic() < deadline:
        left = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([socks[i] for i in pending], [], [], left)
        for s in ready:
            i = index[s.fileno()]
            data, source = s.recvfrom(70000)
            if data == payloads[i] and source[1] == port:
                pending.discard(i)
                wrong.pop(i, None)
            else:
                wrong[i] = "%d bytes from %s" % (len(data), source)
print(json.dumps({"answered": count - len(pending), "missing": sorted(pending), "wrong": wrong,
                  "rounds": rounds, "ports": len({s.getsockname()[1] for s in socks})}))
"""


def dig(lab: Lab, *args: str) -> list[str]:
    """`dig +short` in the client namespace (bounded); the answer lines."""
    done = lab.run(lab.client, ["dig", "+short", "+time=2", "+tries=3", *args], timeout=30)
    return done.stdout.split() if done.returncode == 0 else [f"dig exit {done.returncode}: {done.stdout}"]


def tun_mtu(lab: Lab) -> int:
    shown = lab.run(lab.client, ["ip", "-j", "link", "show", TUN_NAME])
    assert shown.returncode == 0, shown.stderr
    return int(json.loads(shown.stdout)[0]["mtu"])


@pytest.fixture(scope="class")
def shared_vpn(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, client_baseline
) -> Iterator[VpnProcess]:
    vpn = VpnProcess(lab, lab_sshd, "--vpn-dns", "remote")
    try:
        yield vpn.start()
    finally:
        vpn.stop()
    assert_no_unhandled_exceptions(vpn)


class TestThroughTheAgent:
    """One x2ssh run (`--vpn-dns remote`) serves all of these."""

    def test_dig_tunnel_dns_address(self, lab: Lab, shared_vpn: VpnProcess) -> None:
        t = lab.target_addr
        assert dig(lab, f"@{TUN_DNS_V4}", DNS_ZONE, "A") == [t.v4], shared_vpn.describe()
        assert dig(lab, f"@{TUN_DNS_V4}", f"target.{DNS_ZONE}", "AAAA") == [t.v6], shared_vpn.describe()
        assert dig(lab, f"@{TUN_DNS_V6}", DNS_ZONE, "A") == [t.v4], shared_vpn.describe()

    def test_dig_default_resolver(self, lab: Lab, shared_vpn: VpnProcess) -> None:
        resolv = lab.run(lab.client, ["cat", "/etc/resolv.conf"]).stdout
        assert f"nameserver {TUN_DNS_V4}" in resolv, resolv
        assert dig(lab, DNS_ZONE) == [lab.target_addr.v4], resolv + shared_vpn.describe()
        # Over TCP too (what large answers and truncated replies need).
        assert dig(lab, "+tcp", DNS_ZONE) == [lab.target_addr.v4], shared_vpn.describe()

    @pytest.mark.parametrize("family", ["v4", "v6"])
    def test_udp_echo_sizes_up_to_the_tun_mtu(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess, family: str
    ) -> None:
        largest = tun_mtu(lab) - (28 if family == "v4" else 48)
        sizes = [1, 1000, 8000, largest]
        host = getattr(lab.target_addr, family)
        results = udp_echo(lab, host, lab_services.udp_echo.port, sizes)
        assert results == dict.fromkeys(sizes, "ok"), f"{results}{shared_vpn.describe()}"

    @pytest.mark.xfail(
        strict=True,  # an XPASS means the limit is gone: then drop this mark
        reason="limit found: IP fragments arriving on the TUN are not reassembled, so a datagram above "
        "MTU - 48 (v6) never reaches the agent",
    )
    def test_udp_echo_fragmented_datagram(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess
    ) -> None:
        """65,500 bytes over IPv6: more than the TUN's MTU allows, so the client kernel fragments it."""
        host = lab.target_addr.v6
        results = udp_echo(lab, host, lab_services.udp_echo.port, [FRAGMENTED_SIZE])
        assert results == {FRAGMENTED_SIZE: "ok"}, f"MTU {tun_mtu(lab)}: {results}{shared_vpn.describe()}"

    @pytest.mark.parametrize("family", ["v4", "v6"])
    def test_concurrent_udp_flows(
        self, lab: Lab, lab_services: TargetServices, shared_vpn: VpnProcess, family: str
    ) -> None:
        host = getattr(lab.target_addr, family)
        argv = [
            sys.executable,
            "-c",
            FLOWS_PROBE,
            host,
            str(lab_services.udp_echo.port),
            str(CONCURRENT_FLOWS),
        ]
        done = lab.run(lab.client, argv, timeout=60)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["ports"] == CONCURRENT_FLOWS
        assert report["answered"] == CONCURRENT_FLOWS, f"{report}{shared_vpn.describe()}"


def _wait_for_agents(lab: Lab) -> list:
    found: list = []

    def present() -> bool:
        found[:] = agent_processes(lab)
        return bool(found)

    wait_until(present, timeout=15)
    return found


def test_agent_files_gone_after_clean_exit(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    vpn = vpn_launcher.start(lab_sshd)
    assert udp_echo(lab, lab.target_addr.v4, lab_services.udp_echo.port, [100]) == {100: "ok"}, vpn.describe()
    agents = _wait_for_agents(lab)
    assert agents, f"no agent process in the server namespace while UDP works{vpn.describe()}"
    assert all(Path(a.directory).is_dir() for a in agents), agents

    vpn.interrupt()
    assert vpn.wait() == EXIT_SIGINT, vpn.describe()

    def all_gone() -> bool:
        return not any(pid_alive(a.pid) or os.path.lexists(a.directory) for a in agents)

    assert wait_until(all_gone, timeout=15), (
        f"agent left behind after a clean exit: "
        f"{[(a.pid, pid_alive(a.pid), a.directory, os.path.lexists(a.directory)) for a in agents]}"
    )


def test_agent_exits_by_itself_after_sigkill(
    lab: Lab,
    lab_sshd: SshServer,
    lab_services: TargetServices,
    vpn_launcher: VpnLauncher,
    record_property: pytest.RecordProperty,
) -> None:
    vpn = vpn_launcher.start(lab_sshd)
    assert udp_echo(lab, lab.target_addr.v4, lab_services.udp_echo.port, [100]) == {100: "ok"}, vpn.describe()
    agents = _wait_for_agents(lab)
    assert agents, f"no agent process in the server namespace while UDP works{vpn.describe()}"

    vpn.kill()
    assert vpn.wait() == -signal.SIGKILL
    killed_at = time.monotonic()

    def all_gone() -> bool:
        return not any(pid_alive(a.pid) or os.path.lexists(a.directory) for a in agents)

    gone = wait_until(all_gone, timeout=AGENT_EXIT_BOUND, interval=0.1)
    elapsed = time.monotonic() - killed_at
    record_property("agent_exit_after_sigkill_s", round(elapsed, 2))
    print(f"agent gone {elapsed:.2f} s after x2ssh was SIGKILLed")
    assert gone, f"agent still there {AGENT_EXIT_BOUND:g} s after x2ssh was SIGKILLed: {agents}"


def test_server_without_python3_degrades(
    lab: Lab, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    server = lab.sshd(hide_python3=True, port=0)
    try:
        vpn = vpn_launcher.start(server)

        def warned() -> bool:
            return any("agent" in line.lower() and "unavailable" in line.lower() for line in vpn.lines)

        assert wait_until(warned, timeout=10), f"no 'agent ... unavailable' warning{vpn.describe()}"
        out = lab.workdir / "nopython-1k.bin"
        done = curl(lab, lab_services.http.url(lab.target_addr.v4, "1k.bin"), "--fail", "--output", str(out))
        assert done.returncode == 0, f"TCP without the agent: {done.stderr}{vpn.describe()}"
        assert out.stat().st_size == lab_services.http.files["1k.bin"].size
        # DNS-over-TCP fallback: dig still asks over UDP, x2ssh answers it through a TCP channel.
        assert dig(lab, DNS_ZONE) == [lab.target_addr.v4], vpn.describe()
        assert dig(lab, f"@{TUN_DNS_V4}", f"target.{DNS_ZONE}", "AAAA") == [lab.target_addr.v6], (
            vpn.describe()
        )
        vpn.interrupt()
        assert vpn.wait() == EXIT_SIGINT, vpn.describe()
    finally:
        server.stop()


class PacketCapture:
    """tcpdump on one interface of the client namespace; `stop()` returns the packet lines it printed."""

    def __init__(self, lab: Lab, interface: str, expression: str) -> None:
        self.lab = lab
        argv = ["tcpdump", "-i", interface, "-n", "-l", "--immediate-mode", *expression.split()]
        self.proc = lab.popen(lab.client, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        assert self.proc.stderr is not None
        deadline, seen = time.monotonic() + timeout, b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                seen += os.read(self.proc.stderr.fileno(), 4096)
                if b"listening on" in seen:
                    return
        self.lab.kill(self.proc)
        raise RuntimeError(f"tcpdump did not start: {seen!r}")

    def stop(self) -> list[str]:
        time.sleep(0.5)  # let the last packets be printed
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.lab.kill(self.proc)
            out, _ = self.proc.communicate(timeout=10)
        return [line for line in out.decode(errors="replace").splitlines() if line.strip()]


def test_no_dns_packet_in_the_clear(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    expression = "udp port 53 or tcp port 53"
    # Control: without the VPN, a lookup is visible on the physical interface (so the capture works).
    control = PacketCapture(lab, lab.client_if, expression)
    lab.run(lab.client, ["dig", "+time=1", "+tries=1", DNS_ZONE], timeout=20)
    assert control.stop(), "tcpdump saw no DNS packet even without the VPN: the capture cannot detect leaks"

    vpn = vpn_launcher.start(lab_sshd)
    capture = PacketCapture(lab, lab.client_if, expression)
    try:
        answers = [
            dig(lab, DNS_ZONE),
            dig(lab, f"target.{DNS_ZONE}", "AAAA"),
            lab.run(lab.client, ["getent", "ahostsv4", DNS_ZONE], timeout=20).stdout.split()[:1],
        ]
        fetched = curl(lab, f"http://{DNS_ZONE}/1k.bin", "--fail", "--output", "/dev/null")
    finally:
        leaked = capture.stop()
    assert answers == [[lab.target_addr.v4], [lab.target_addr.v6], [lab.target_addr.v4]], vpn.describe()
    assert fetched.returncode == 0, fetched.stderr
    assert leaked == [], f"DNS packets on {lab.client_if} during the VPN:\n" + "\n".join(leaked)
